"""Grouped matmul for TPUs in Pallas Mosaic, megablox-style: the grid walks "visits", the (row tile, group)
pairs that intersect, listed by `_visits` in common.py and scalar-prefetched so the BlockSpec index maps pick
lhs[row tile] and rhs[group]; an f32 VMEM accumulator collects the masked rows of every group of a row tile
and is written out on the tile's last visit. Operands come padded to whole tiles from ops.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.gmm.common import F32, _keep, _rhs_dims


def _interpret(interpret: bool):
  if not interpret:
    return False
  return pltpu.InterpretParams()


def gmm(visits, lhs, rhs, out_dtype, tm, tk, tn, transpose_rhs, interpret):
  m_pad, k_pad = lhs.shape
  n_pad = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  nv, nk = visits[0].shape[0], k_pad // tk

  def kernel(tiles, groups, lo, hi, lhs_ref, rhs_ref, out_ref, acc_ref):
    del groups
    v, kk = pl.program_id(1), pl.program_id(2)
    tile = tiles[v]
    first = jnp.logical_or(v == 0, tiles[jnp.maximum(v - 1, 0)] != tile)
    last = jnp.logical_or(v == nv - 1, tiles[jnp.minimum(v + 1, nv - 1)] != tile)

    @pl.when(jnp.logical_and(first, kk == 0))
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi[v] > lo[v])
    def _accumulate():
      rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
      x = _keep(lhs_ref[...], jnp.logical_and(rows >= lo[v], rows < hi[v]))
      acc_ref[...] += jax.lax.dot_general(x, rhs_ref[...], _rhs_dims(transpose_rhs), preferred_element_type=F32)

    @pl.when(jnp.logical_and(last, kk == nk - 1))
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, t, g, lo, hi: (g[v], j, kk))
  else:
    rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, t, g, lo, hi: (g[v], kk, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(n_pad // tn, nv, nk),
      in_specs=[pl.BlockSpec((tm, tk), lambda j, v, kk, t, g, lo, hi: (t[v], kk)), rhs_spec],
      out_specs=pl.BlockSpec((tm, tn), lambda j, v, kk, t, g, lo, hi: (t[v], j)),
      scratch_shapes=[pltpu.VMEM((tm, tn), F32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret), name="gmm_tpu")(*visits, lhs, rhs)


def tgmm(visits, lhs, dout, num_groups, out_dtype, tm, tk, tn, interpret):
  k_pad, n_pad = lhs.shape[1], dout.shape[1]
  nv = visits[0].shape[0]

  def kernel(tiles, groups, lo, hi, lhs_ref, dout_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    g = groups[v]
    first = jnp.logical_or(v == 0, groups[jnp.maximum(v - 1, 0)] != g)
    last = jnp.logical_or(v == nv - 1, groups[jnp.minimum(v + 1, nv - 1)] != g)

    @pl.when(first)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi[v] > lo[v])
    def _accumulate():
      row0 = tiles[v] * tm
      rows_x = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
      rows_y = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      # Mask both sides: a non-finite value in another group's row must not leak in as 0 * inf.
      x = jnp.where(jnp.logical_and(rows_x >= lo[v], rows_x < hi[v]), lhs_ref[...].astype(F32), 0.0)
      y = _keep(dout_ref[...], jnp.logical_and(rows_y >= lo[v], rows_y < hi[v]))
      # Transpose in f32 (Mosaic's most general transpose), then feed the MXU in the input dtype.
      acc_ref[...] += jax.lax.dot(x.T.astype(y.dtype), y, preferred_element_type=F32)

    @pl.when(last)
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(k_pad // tk, n_pad // tn, nv),
      in_specs=[pl.BlockSpec((tm, tk), lambda i, j, v, t, g, lo, hi: (t[v], i)),
                pl.BlockSpec((tm, tn), lambda i, j, v, t, g, lo, hi: (t[v], j))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, v, t, g, lo, hi: (g[v], i, j)),
      scratch_shapes=[pltpu.VMEM((tk, tn), F32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), out_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret), name="tgmm_tpu")(*visits, lhs, dout)
