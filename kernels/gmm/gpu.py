"""Grouped matmul for GPUs in Pallas Triton: one program per (visit, n tile) with the visit list (`_visits` in
common.py) as plain int32 inputs; each loops over k and stores only its own group's rows (masked store) into a
zero-initialised output. tgmm runs one program per (k tile, n tile, group) over the group's row tiles.
Operands come padded to whole tiles from ops.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gmm.common import F32, _rhs_dims


def _params():
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def gmm(visits, lhs, rhs, out_dtype, tm, tk, tn, transpose_rhs, interpret):
  m_pad, k_pad = lhs.shape
  n_pad = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  nv, nk = visits[0].shape[0], k_pad // tk

  def kernel(tiles_ref, groups_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, zeros_ref, out_ref):
    del zeros_ref  # aliased to out_ref: rows that no visit stores stay zero
    j, v = pl.program_id(0), pl.program_id(1)
    lo, hi = lo_ref[v], hi_ref[v]

    @pl.when(hi > lo)
    def _visit():
      g, row0 = groups_ref[v], tiles_ref[v] * tm
      rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      keep = jnp.logical_and(rows >= lo, rows < hi)

      def body(kk, acc):
        x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(kk * tk, tk)], mask=jnp.broadcast_to(keep, (tm, tk)),
                       other=0)
        if transpose_rhs:
          w = rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
        else:
          w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
        return acc + jax.lax.dot_general(x, w, _rhs_dims(transpose_rhs), preferred_element_type=F32)

      acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((tm, tn), F32))
      # Other visits of this row tile own its other rows: store only ours.
      plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
                  mask=jnp.broadcast_to(keep, (tm, tn)))

  full = lambda x: pl.BlockSpec(x.shape, lambda j, v: (0,) * x.ndim)
  zeros = jnp.zeros((m_pad, n_pad), out_dtype)
  args = (*visits, lhs, rhs, zeros)
  return pl.pallas_call(
      kernel, grid=(n_pad // tn, nv), in_specs=[full(a) for a in args], out_specs=full(zeros),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype), input_output_aliases={len(args) - 1: 0},
      compiler_params=_params(), interpret=interpret, name="gmm_triton")(*args)


def tgmm(starts, ends, lhs, dout, out_dtype, tm, tk, tn, interpret):
  num_groups, k_pad, n_pad = starts.shape[0], lhs.shape[1], dout.shape[1]

  def kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref):
    i, j, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = starts_ref[g], ends_ref[g]
    count = jnp.where(hi > lo, (hi - 1) // tm - lo // tm + 1, 0)  # 0 for an empty group: its gradient is zero

    def body(t, acc):
      row0 = (lo // tm + t) * tm
      rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      keep = jnp.logical_and(rows >= lo, rows < hi)
      x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(i * tk, tk)], mask=jnp.broadcast_to(keep, (tm, tk)),
                     other=0)
      y = plgpu.load(dout_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)], mask=jnp.broadcast_to(keep, (tm, tn)),
                     other=0)
      return acc + jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    acc = jax.lax.fori_loop(0, count, body, jnp.zeros((tk, tn), F32))
    out_ref[...] = acc.astype(out_ref.dtype)

  full = lambda x: pl.BlockSpec(x.shape, lambda i, j, g: (0,) * x.ndim)
  args = (starts, ends, lhs, dout)
  return pl.pallas_call(
      kernel, grid=(k_pad // tk, n_pad // tn, num_groups), in_specs=[full(a) for a in args],
      out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, g: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), out_dtype),
      compiler_params=_params(), interpret=interpret, name="tgmm_triton")(*args)
