"""Grouped matmul (MoE experts) in Pallas: `gmm` (out = lhs[rows of g] @ rhs[g]) and `tgmm`, its weight gradient.

Rows of lhs are sorted by group; group_sizes [G] says how many rows each group owns, in order. Rows past
sum(group_sizes) belong to no group: their output and their lhs gradient are zero. Backends:
  'tpu'       Pallas Mosaic, megablox-style: the grid walks "visits", the (row tile, group) pairs that
              intersect, listed by a jit-friendly wrapper and scalar-prefetched so the BlockSpec index maps
              pick lhs[row tile] and rhs[group]; an f32 VMEM accumulator collects the masked rows of every
              group of a row tile and is written out on the tile's last visit.
  'gpu'       Pallas Triton: one program per (visit, n tile) with the visit list as plain int32 inputs; each
              loops over k and stores only its own group's rows (masked store) into a zero-initialised output.
  'reference' `jax.lax.ragged_dot` / `jax.lax.ragged_dot_general` (XLA).
  'auto'      'tpu' or 'gpu' on those platforms, 'reference' elsewhere.
The Pallas backends differentiate through a custom_vjp: d lhs = gmm(dout, rhs^T), d rhs = tgmm(lhs, dout).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.platform import check_runnable, resolve_backend

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes:
  """Row (tm), contraction (tk) and output-column (tn) tile sizes. Powers of two (Triton); on a real TPU tm a
  multiple of 8 (16 for bfloat16) and tk, tn multiples of 128. A tile larger than its (padded) dimension is
  shrunk to the next power of two that covers it, so small problems are one tile."""

  tm: int = 128
  tk: int = 128
  tn: int = 128


@dataclasses.dataclass(frozen=True)
class _Static:
  """The non-array part of a call: hashable, a static argument of the custom_vjp and of jit."""

  backend: str
  interpret: bool
  blocks: GmmBlockSizes
  out_dtype: jnp.dtype


def _static(backend: str, interpret: bool, block_sizes: GmmBlockSizes | None, out_dtype) -> _Static:
  blocks = block_sizes or GmmBlockSizes()
  sizes = (blocks.tm, blocks.tk, blocks.tn)
  if any(t < 1 or t & (t - 1) for t in sizes):
    raise ValueError(f"gmm block sizes must be powers of two, got {blocks}")
  return _Static(backend, interpret, blocks, jnp.dtype(out_dtype))


def _tile(dim: int, t: int) -> int:
  # Never pad a small dimension up to a big tile; one power-of-two tile (>= 16, Triton's smallest dot) covers it.
  return min(t, max(16, pl.next_power_of_2(dim)))


def _pad_to(x, shape):
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _group_bounds(group_sizes, m: int):
  """First and one-past-last row of each group, clipped to the m rows that exist."""
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _visits(group_sizes, m: int, m_pad: int, tm: int, *, for_tgmm: bool):
  """The (row tile, group) pairs to visit, in row order, padded to the static count T + G - 1.

  Returns int32 arrays tile, group, lo, hi: visit v reads row tile tile[v] and rhs[group[v]] and owns rows
  [lo[v], hi[v]). Nonempty groups visit every tile they touch; the pairs number at most (tiles holding
  rows) + (nonempty groups) - 1. For gmm the tiles past the last group get one empty visit each so that
  their output is written (zeros); for tgmm every empty group gets one empty visit so that its weight
  gradient is written (zeros). Either way the count stays <= T + G - 1. The padding visits repeat the last
  real one (same blocks, so no new DMA) with an empty row range, so they add nothing.
  """
  num_groups, num_tiles = group_sizes.shape[0], m_pad // tm
  starts, ends = _group_bounds(group_sizes, m)
  nonempty = ends > starts
  count = jnp.where(nonempty, (ends - 1) // tm - starts // tm + 1, 0)
  if for_tgmm:
    count = jnp.maximum(count, 1)
  visit_ends = jnp.cumsum(count)
  n_group_visits = visit_ends[-1]
  v = jnp.arange(num_tiles + num_groups - 1, dtype=jnp.int32)
  g = jnp.minimum(jnp.searchsorted(visit_ends, v, side="right"), num_groups - 1).astype(jnp.int32)
  in_group = v < n_group_visits
  tile = jnp.minimum(starts[g] // tm + v - (visit_ends[g] - count[g]), num_tiles - 1)
  lo, hi = jnp.where(in_group, starts[g], 0), jnp.where(in_group, ends[g], 0)
  if not for_tgmm:
    tail = (ends[-1] + tm - 1) // tm + v - n_group_visits  # tiles holding no group's rows
    n_real = n_group_visits + num_tiles - (ends[-1] + tm - 1) // tm
    tile = jnp.where(in_group, tile, jnp.minimum(tail, num_tiles - 1))
  else:
    n_real = n_group_visits
  last = jnp.maximum(n_real - 1, 0)
  tile = jnp.where(v < n_real, tile, tile[last])
  g = jnp.where(in_group, g, g[jnp.maximum(n_group_visits - 1, 0)])
  return tile.astype(jnp.int32), g, lo.astype(jnp.int32), hi.astype(jnp.int32)


def _keep(x, keep):
  # Select in f32: older TPUs have no bfloat16 VPU path.
  return jnp.where(keep, x.astype(F32), 0.0).astype(x.dtype)


def _rhs_dims(transpose_rhs: bool):
  return (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))


# ------------------------------------------------------------------------------------------------- TPU (Mosaic)

def _tpu_interpret(interpret: bool):
  if not interpret:
    return False
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams()


def _tpu_gmm(visits, lhs, rhs, out_dtype, tm, tk, tn, transpose_rhs, interpret):
  from jax.experimental.pallas import tpu as pltpu
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
      interpret=_tpu_interpret(interpret), name="gmm_tpu")(*visits, lhs, rhs)


def _tpu_tgmm(visits, lhs, dout, num_groups, out_dtype, tm, tk, tn, interpret):
  from jax.experimental.pallas import tpu as pltpu
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
      interpret=_tpu_interpret(interpret), name="tgmm_tpu")(*visits, lhs, dout)


# ------------------------------------------------------------------------------------------------ GPU (Triton)

def _gpu_params():
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _gpu_gmm(visits, lhs, rhs, out_dtype, tm, tk, tn, transpose_rhs, interpret):
  from jax.experimental.pallas import triton as plgpu
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
      compiler_params=_gpu_params(), interpret=interpret, name="gmm_triton")(*args)


def _gpu_tgmm(starts, ends, lhs, dout, out_dtype, tm, tk, tn, interpret):
  from jax.experimental.pallas import triton as plgpu
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
      compiler_params=_gpu_params(), interpret=interpret, name="tgmm_triton")(*args)


# ---------------------------------------------------------------------------------------- wrappers and the vjp

@functools.partial(jax.jit, static_argnames=("static", "transpose_rhs"))
def _gmm_pallas(lhs, rhs, group_sizes, static: _Static, transpose_rhs: bool = False):
  """Pads m, k, n to whole tiles, builds the visit list, runs the kernel and slices the padding off."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  b = static.blocks
  tm, tk, tn = _tile(m, b.tm), _tile(k, b.tk), _tile(n, b.tn)
  m_pad, k_pad, n_pad = pl.cdiv(m, tm) * tm, pl.cdiv(k, tk) * tk, pl.cdiv(n, tn) * tn
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  lhs = _pad_to(lhs.astype(dtype), (m_pad, k_pad))
  rhs_shape = (rhs.shape[0], n_pad, k_pad) if transpose_rhs else (rhs.shape[0], k_pad, n_pad)
  rhs = _pad_to(rhs.astype(dtype), rhs_shape)
  visits = _visits(group_sizes, m, m_pad, tm, for_tgmm=False)
  kernel = _tpu_gmm if static.backend == "tpu" else _gpu_gmm
  out = kernel(visits, lhs, rhs, static.out_dtype, tm, tk, tn, transpose_rhs, static.interpret)
  return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("static",))
def _tgmm_pallas(lhs, dout, group_sizes, static: _Static):
  m, k = lhs.shape
  n, num_groups = dout.shape[1], group_sizes.shape[0]
  b = static.blocks
  tm, tk, tn = _tile(m, b.tm), _tile(k, b.tk), _tile(n, b.tn)
  m_pad, k_pad, n_pad = pl.cdiv(m, tm) * tm, pl.cdiv(k, tk) * tk, pl.cdiv(n, tn) * tn
  dtype = jnp.result_type(lhs.dtype, dout.dtype)
  lhs = _pad_to(lhs.astype(dtype), (m_pad, k_pad))
  dout = _pad_to(dout.astype(dtype), (m_pad, n_pad))
  if static.backend == "tpu":
    visits = _visits(group_sizes, m, m_pad, tm, for_tgmm=True)
    out = _tpu_tgmm(visits, lhs, dout, num_groups, static.out_dtype, tm, tk, tn, static.interpret)
  else:
    starts, ends = _group_bounds(group_sizes, m)
    out = _gpu_tgmm(starts, ends, lhs, dout, static.out_dtype, tm, tk, tn, static.interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_vjp(lhs, rhs, group_sizes, static: _Static):
  return _gmm_pallas(lhs, rhs, group_sizes, static)


def _gmm_fwd(lhs, rhs, group_sizes, static):
  return _gmm_pallas(lhs, rhs, group_sizes, static), (lhs, rhs, group_sizes)


def _gmm_bwd(static, residuals, dout):
  lhs, rhs, group_sizes = residuals
  # rhs^T is read through transposed blocks rather than materialised.
  dlhs = _gmm_pallas(dout, rhs, group_sizes, dataclasses.replace(static, out_dtype=lhs.dtype), transpose_rhs=True)
  drhs = _tgmm_pallas(lhs, dout, group_sizes, dataclasses.replace(static, out_dtype=rhs.dtype))
  return dlhs, drhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _check_args(lhs, rhs_or_dout, group_sizes, name: str, rhs_ndim: int):
  if lhs.ndim != 2 or rhs_or_dout.ndim != rhs_ndim or group_sizes.ndim != 1:
    raise ValueError(f"{name}: need lhs [m, k], {'rhs [G, k, n]' if rhs_ndim == 3 else 'dout [m, n]'} and "
                     f"group_sizes [G]; got {lhs.shape}, {rhs_or_dout.shape}, {group_sizes.shape}")
  if rhs_ndim == 3 and (rhs_or_dout.shape[0] != group_sizes.shape[0] or rhs_or_dout.shape[1] != lhs.shape[1]):
    raise ValueError(f"gmm: rhs {rhs_or_dout.shape} does not match lhs {lhs.shape} and {group_sizes.shape[0]} groups")
  if rhs_ndim == 2 and rhs_or_dout.shape[0] != lhs.shape[0]:
    raise ValueError(f"tgmm: dout {rhs_or_dout.shape} and lhs {lhs.shape} differ in rows")
  if group_sizes.shape[0] < 1:
    raise ValueError(f"{name}: need at least one group")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be integers, got {group_sizes.dtype}")


def gmm(lhs, rhs, group_sizes, *, backend: str = "auto", interpret: bool = False,
        block_sizes: GmmBlockSizes | None = None, preferred_element_type=None):
  """Grouped matmul: out[r] = lhs[r] @ rhs[g(r)] where row r belongs to group g(r).

  lhs [m, k] with rows sorted by group; rhs [G, k, n]; group_sizes [G] int32 with sum <= m (rows past the
  sum give zeros). Returns [m, n] in preferred_element_type (default lhs.dtype), accumulated in float32.
  backend: 'reference' (jax.lax.ragged_dot), 'tpu' (Pallas Mosaic), 'gpu' (Pallas Triton) or 'auto';
  interpret=True runs the Pallas kernels in the interpreter on any platform (slow; for tests).
  """
  _check_args(lhs, rhs, group_sizes, "gmm", 3)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  backend = resolve_backend(backend)
  if backend == "reference":
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=F32).astype(out_dtype)
  check_runnable(backend, interpret, "gmm")
  return _gmm_vjp(lhs, rhs, group_sizes, _static(backend, interpret, block_sizes, out_dtype))


def tgmm(lhs, dout, group_sizes, *, backend: str = "auto", interpret: bool = False,
         block_sizes: GmmBlockSizes | None = None, preferred_element_type=None):
  """Transposed grouped matmul (the weight gradient of gmm): out[g] = lhs[rows of g]^T @ dout[rows of g].

  lhs [m, k], dout [m, n], group_sizes [G] -> [G, k, n] in preferred_element_type (default lhs.dtype);
  an empty group gives zeros, rows past sum(group_sizes) are ignored.
  """
  _check_args(lhs, dout, group_sizes, "tgmm", 2)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  backend = resolve_backend(backend)
  if backend == "reference":
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims, preferred_element_type=F32).astype(out_dtype)
  check_runnable(backend, interpret, "gmm")
  return _tgmm_pallas(lhs, dout, group_sizes, _static(backend, interpret, block_sizes, out_dtype))
