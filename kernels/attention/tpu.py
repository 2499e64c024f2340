"""Flash attention for TPUs in Pallas Mosaic. Key (or query) blocks stream along the last grid axes, so
only one (double-buffered) block of each operand sits in VMEM; running statistics live in VMEM scratch
across those "arbitrary" axes. Blocks outside the causal / window band are skipped with `pl.when`, and
their index maps are clamped into the band so the pipeline does not copy them in. Layout
[b, heads, seq, d], padded to whole blocks by the caller (ops.py); the block math is in common.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention.common import (NEG, backward_step, block_mask, finish, kv_block_range,
                                      online_softmax_step, q_block_range)


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _iota(rows, cols, axis, start):
  return start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), axis)


def _clamp(static, idx, lower, upper):
  """A streamed block index pulled into [lower, upper): skipped steps then repeat the index of a block
  already in VMEM, and the pipeline issues no copy for a repeated index."""
  if not static.causal and static.window is None:
    return idx  # every block is visited
  return jnp.minimum(jnp.maximum(idx, lower), jnp.maximum(upper - 1, 0))


def _kv_index(static, bq, bk, nk):
  """Index of the key block at grid step (i, j), clamped to the blocks query block i can see."""
  return lambda i, j: _clamp(static, j, *kv_block_range(static, i * bq, bq, bk, nk))


def forward(q, k, v, q_seg, k_seg, sinks, static, bq, bk):
  b, n, tp, d = q.shape
  kvh, sp = k.shape[1], k.shape[2]
  g, nq, nk = n // kvh, tp // bq, sp // bk
  has_seg, has_sink = q_seg is not None, sinks is not None

  def kernel(*refs):
    q_ref, k_ref, v_ref = refs[:3]
    rest = list(refs[3:])
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if has_seg else (None, None)
    sink_ref = rest.pop(0) if has_sink else None
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
      if has_sink:
        m_sc[...] = jnp.broadcast_to(sink_ref[pl.ds(h, 1), :], (bq, 1))
        l_sc[...] = jnp.ones((bq, 1), jnp.float32)
      else:
        m_sc[...] = jnp.full((bq, 1), NEG, jnp.float32)
        l_sc[...] = jnp.zeros((bq, 1), jnp.float32)
      acc_sc[...] = jnp.zeros((bq, d), jnp.float32)

    lower, upper = kv_block_range(static, i * bq, bq, bk, nk)

    @pl.when((j >= lower) & (j < upper))
    def _step():
      mask = block_mask(static, _iota(bq, 1, 0, i * bq), _iota(1, bk, 1, j * bk),
                        qs_ref[...] if has_seg else None, ks_ref[...] if has_seg else None)
      m, l, acc = online_softmax_step(static, q_ref[...], k_ref[...], v_ref[...], mask, m_sc[...], l_sc[...],
                                      acc_sc[...])
      m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(j == nk - 1)
    def _finish():
      out, lse = finish(m_sc[...], l_sc[...], acc_sc[...])
      o_ref[...] = out.astype(o_ref.dtype)
      lse_ref[...] = lse

  kv_idx = _kv_index(static, bq, bk, nk)
  in_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j: (bi, h, i, 0)),
              pl.BlockSpec((None, None, bk, d), lambda bi, h, i, j: (bi, h // g, kv_idx(i, j), 0)),
              pl.BlockSpec((None, None, bk, d), lambda bi, h, i, j: (bi, h // g, kv_idx(i, j), 0))]
  args = [q, k, v]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda bi, h, i, j: (bi, i, 0)),
                 pl.BlockSpec((None, 1, bk), lambda bi, h, i, j: (bi, 0, kv_idx(i, j)))]
    args += [q_seg, k_seg]
  if has_sink:
    in_specs.append(pl.BlockSpec((n, 1), lambda bi, h, i, j: (0, 0)))
    args.append(sinks)
  return pl.pallas_call(
      kernel, grid=(b, n, nq, nk), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j: (bi, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j: (bi, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"), interpret=static.interpret,
      name="flash_attention_fwd_mosaic")(*args)


def backward(q, k, v, do, lse, delta, q_seg, k_seg, static, bq, bk):
  b, n, tp, d = q.shape
  kvh, sp = k.shape[1], k.shape[2]
  g, nq, nk = n // kvh, tp // bq, sp // bk
  has_seg = q_seg is not None
  seg_args = [q_seg, k_seg] if has_seg else []

  def dq_kernel(*refs):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dq_ref, dq_sc = refs[-2:]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
      dq_sc[...] = jnp.zeros((bq, d), jnp.float32)

    lower, upper = kv_block_range(static, i * bq, bq, bk, nk)

    @pl.when((j >= lower) & (j < upper))
    def _step():
      kb = k_ref[...]
      mask = block_mask(static, _iota(bq, 1, 0, i * bq), _iota(1, bk, 1, j * bk),
                        qs_ref[...] if has_seg else None, ks_ref[...] if has_seg else None)
      ds, _ = backward_step(static, q_ref[...], kb, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask)
      dq_sc[...] += jax.lax.dot_general(ds.astype(kb.dtype), kb, (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _write():
      dq_ref[...] = (dq_sc[...] * static.scale).astype(dq_ref.dtype)

  kv_idx = _kv_index(static, bq, bk, nk)
  row = lambda bi, h, i, j: (bi, h, i, 0)
  kv = lambda bi, h, i, j: (bi, h // g, kv_idx(i, j), 0)
  dq_specs = [pl.BlockSpec((None, None, bq, d), row), pl.BlockSpec((None, None, bk, d), kv),
              pl.BlockSpec((None, None, bk, d), kv), pl.BlockSpec((None, None, bq, d), row),
              pl.BlockSpec((None, None, bq, 1), row), pl.BlockSpec((None, None, bq, 1), row)]
  if has_seg:
    dq_specs += [pl.BlockSpec((None, bq, 1), lambda bi, h, i, j: (bi, i, 0)),
                 pl.BlockSpec((None, 1, bk), lambda bi, h, i, j: (bi, 0, kv_idx(i, j)))]
  dq = pl.pallas_call(
      dq_kernel, grid=(b, n, nq, nk), in_specs=dq_specs, out_specs=pl.BlockSpec((None, None, bq, d), row),
      out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32), scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"), interpret=static.interpret,
      name="flash_attention_dq_mosaic")(q, k, v, do, lse, delta, *seg_args)

  def dkv_kernel(*refs):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dk_ref, dv_ref, dk_sc, dv_sc = refs[-4:]
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
      dk_sc[...] = jnp.zeros((bk, d), jnp.float32)
      dv_sc[...] = jnp.zeros((bk, d), jnp.float32)

    lower, upper = q_block_range(static, j * bk, bk, bq, nq)

    @pl.when((i >= lower) & (i < upper))
    def _step():
      qb, dob = q_ref[...], do_ref[...]
      mask = block_mask(static, _iota(bq, 1, 0, i * bq), _iota(1, bk, 1, j * bk),
                        qs_ref[...] if has_seg else None, ks_ref[...] if has_seg else None)
      ds, p = backward_step(static, qb, k_ref[...], v_ref[...], dob, lse_ref[...], delta_ref[...], mask)
      dv_sc[...] += jax.lax.dot_general(p.astype(dob.dtype), dob, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
      dk_sc[...] += jax.lax.dot_general(ds.astype(qb.dtype), qb, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when((gi == g - 1) & (i == nq - 1))
    def _write():
      dk_ref[...] = (dk_sc[...] * static.scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

  q_idx = lambda j, i: _clamp(static, i, *q_block_range(static, j * bk, bk, bq, nq))
  q_row = lambda bi, kh, j, gi, i: (bi, kh * g + gi, q_idx(j, i), 0)
  kv_row = lambda bi, kh, j, gi, i: (bi, kh, j, 0)
  dkv_specs = [pl.BlockSpec((None, None, bq, d), q_row), pl.BlockSpec((None, None, bk, d), kv_row),
               pl.BlockSpec((None, None, bk, d), kv_row), pl.BlockSpec((None, None, bq, d), q_row),
               pl.BlockSpec((None, None, bq, 1), q_row), pl.BlockSpec((None, None, bq, 1), q_row)]
  if has_seg:
    dkv_specs += [pl.BlockSpec((None, bq, 1), lambda bi, kh, j, gi, i: (bi, q_idx(j, i), 0)),
                  pl.BlockSpec((None, 1, bk), lambda bi, kh, j, gi, i: (bi, 0, j))]
  dk, dv = pl.pallas_call(
      dkv_kernel, grid=(b, kvh, nk, g, nq), in_specs=dkv_specs,
      out_specs=[pl.BlockSpec((None, None, bk, d), kv_row), pl.BlockSpec((None, None, bk, d), kv_row)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32), jax.ShapeDtypeStruct(v.shape, jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
      interpret=static.interpret, name="flash_attention_dkv_mosaic")(q, k, v, do, lse, delta, *seg_args)
  return dq, dk, dv
