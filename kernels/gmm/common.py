"""Grouped matmul: what the TPU and GPU kernels and the wrappers in ops.py share: the tile sizes and static
call description, padding, group bounds and the (row tile, group) visit list. Imports nothing from tpu.py,
gpu.py or ops.py, which all import this module."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

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
