"""Flash attention for GPUs in Pallas Triton: one program per (batch, head, query block) looping over the
key blocks it can see (forward and dq); one per (batch, kv head, key block) looping over the query heads of
its group and the query blocks that see it (dk, dv). Layout [b, heads, seq, d], sequences padded to whole
blocks by the caller (ops.py); the masks and the online-softmax math are in common.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.attention.common import (NEG, backward_step, block_mask, finish, kv_block_range,
                                      online_softmax_step, q_block_range)


def _params():
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


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
    o_ref, lse_ref = rest
    h, i = pl.program_id(1), pl.program_id(2)
    qb = q_ref[...]
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    if has_sink:
      m = jnp.broadcast_to(sink_ref[pl.ds(h, 1), :], (bq, 1))
      l = jnp.ones((bq, 1), jnp.float32)
    else:
      m, l = jnp.full((bq, 1), NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32)
    lower, upper = kv_block_range(static, i * bq, bq, bk, nk)

    def body(j, carry):
      kb, vb = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
      k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      qs = ks = None
      if has_seg:
        qs, ks = qs_ref[...], ks_ref[:, pl.ds(j * bk, bk)]
      return online_softmax_step(static, qb, kb, vb, block_mask(static, q_idx, k_idx, qs, ks), *carry)

    m, l, acc = jax.lax.fori_loop(lower, upper, body, (m, l, jnp.zeros((bq, d), jnp.float32)))
    out, lse = finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse

  in_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, h, i: (bi, h, i, 0)),
              pl.BlockSpec((None, None, sp, d), lambda bi, h, i: (bi, h // g, 0, 0)),
              pl.BlockSpec((None, None, sp, d), lambda bi, h, i: (bi, h // g, 0, 0))]
  args = [q, k, v]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda bi, h, i: (bi, i, 0)),
                 pl.BlockSpec((None, 1, sp), lambda bi, h, i: (bi, 0, 0))]
    args += [q_seg, k_seg]
  if has_sink:
    rows = 1 << max(0, (n - 1).bit_length())  # Triton arrays have power-of-two shapes
    in_specs.append(pl.BlockSpec((rows, 1), lambda bi, h, i: (0, 0)))
    args.append(jnp.pad(sinks, ((0, rows - n), (0, 0))))
  return pl.pallas_call(
      kernel, grid=(b, n, nq), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, h, i: (bi, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda bi, h, i: (bi, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
      compiler_params=_params(), interpret=static.interpret, name="flash_attention_fwd_triton")(*args)


def backward(q, k, v, do, lse, delta, q_seg, k_seg, static, bq, bk):
  b, n, tp, d = q.shape
  kvh, sp = k.shape[1], k.shape[2]
  g, nq, nk = n // kvh, tp // bq, sp // bk
  has_seg = q_seg is not None
  seg_args = [q_seg, k_seg] if has_seg else []

  def dq_kernel(*refs):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dq_ref = refs[-1]
    i = pl.program_id(2)
    qb, dob, lse_b, delta_b = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lower, upper = kv_block_range(static, i * bq, bq, bk, nk)

    def body(j, dq):
      kb, vb = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
      k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      qs, ks = (qs_ref[...], ks_ref[:, pl.ds(j * bk, bk)]) if has_seg else (None, None)
      ds, _ = backward_step(static, qb, kb, vb, dob, lse_b, delta_b, block_mask(static, q_idx, k_idx, qs, ks))
      return dq + jax.lax.dot_general(ds.astype(kb.dtype), kb, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(lower, upper, body, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)

  row = lambda bi, h, i: (bi, h, i, 0)
  dq_specs = [pl.BlockSpec((None, None, bq, d), row),
              pl.BlockSpec((None, None, sp, d), lambda bi, h, i: (bi, h // g, 0, 0)),
              pl.BlockSpec((None, None, sp, d), lambda bi, h, i: (bi, h // g, 0, 0)),
              pl.BlockSpec((None, None, bq, d), row),
              pl.BlockSpec((None, None, bq, 1), row), pl.BlockSpec((None, None, bq, 1), row)]
  if has_seg:
    dq_specs += [pl.BlockSpec((None, bq, 1), lambda bi, h, i: (bi, i, 0)),
                 pl.BlockSpec((None, 1, sp), lambda bi, h, i: (bi, 0, 0))]
  dq = pl.pallas_call(
      dq_kernel, grid=(b, n, nq), in_specs=dq_specs, out_specs=pl.BlockSpec((None, None, bq, d), row),
      out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32), compiler_params=_params(),
      interpret=static.interpret, name="flash_attention_dq_triton")(q, k, v, do, lse, delta, *seg_args)

  def dkv_kernel(*refs):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dk_ref, dv_ref = refs[-2:]
    j = pl.program_id(2)
    kb, vb = k_ref[...], v_ref[...]
    k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    ks = ks_ref[...] if has_seg else None
    lower, upper = q_block_range(static, j * bk, bk, bq, nq)
    # Bidirectional without a window both bounds are Python ints, and Triton cannot lower `step % span`
    # against such a constant: keep the span a traced int32.
    span = jnp.maximum(jnp.asarray(upper - lower, jnp.int32), 0)

    def body(step, carry):
      dk, dv = carry
      gi, i = step // span, lower + step % span
      rows = pl.ds(i * bq, bq)
      qb, dob = q_ref[gi, rows, :], do_ref[gi, rows, :]
      q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      qs = qs_ref[rows, :] if has_seg else None
      ds, p = backward_step(static, qb, kb, vb, dob, lse_ref[gi, rows, :], delta_ref[gi, rows, :],
                            block_mask(static, q_idx, k_idx, qs, ks))
      dv = dv + jax.lax.dot_general(p.astype(dob.dtype), dob, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      dk = dk + jax.lax.dot_general(ds.astype(qb.dtype), qb, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      return dk, dv

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, g * span, body, (zeros, zeros))
    dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

  group = lambda bi, kh, j: (bi, kh, 0, 0)
  kv_row = lambda bi, kh, j: (bi, kh, j, 0)
  dkv_specs = [pl.BlockSpec((None, g, tp, d), group),
               pl.BlockSpec((None, None, bk, d), kv_row), pl.BlockSpec((None, None, bk, d), kv_row),
               pl.BlockSpec((None, g, tp, d), group),
               pl.BlockSpec((None, g, tp, 1), group), pl.BlockSpec((None, g, tp, 1), group)]
  if has_seg:
    dkv_specs += [pl.BlockSpec((None, tp, 1), lambda bi, kh, j: (bi, 0, 0)),
                  pl.BlockSpec((None, 1, bk), lambda bi, kh, j: (bi, 0, j))]
  dk, dv = pl.pallas_call(
      dkv_kernel, grid=(b, kvh, nk), in_specs=dkv_specs,
      out_specs=[pl.BlockSpec((None, None, bk, d), kv_row), pl.BlockSpec((None, None, bk, d), kv_row)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32), jax.ShapeDtypeStruct(v.shape, jnp.float32)],
      compiler_params=_params(), interpret=static.interpret,
      name="flash_attention_dkv_triton")(q, k, v, do, lse, delta, *seg_args)
  return dq, dk, dv
