"""Grouped matmul (MoE experts) in Pallas: `gmm` (out = lhs[rows of g] @ rhs[g]) and `tgmm`, its weight gradient.
This module holds the public API, the jitted wrappers and the custom_vjp; the kernels are in tpu.py and gpu.py,
the pieces they share in common.py.

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

from kernels.gmm.common import F32, GmmBlockSizes, _group_bounds, _pad_to, _Static, _static, _tile, _visits
from kernels.gmm.gpu import gmm as gpu_gmm, tgmm as gpu_tgmm
from kernels.gmm.tpu import gmm as tpu_gmm, tgmm as tpu_tgmm
from kernels.platform import check_runnable, resolve_backend


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
  kernel = tpu_gmm if static.backend == "tpu" else gpu_gmm
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
    out = tpu_tgmm(visits, lhs, dout, num_groups, static.out_dtype, tm, tk, tn, static.interpret)
  else:
    starts, ends = _group_bounds(group_sizes, m)
    out = gpu_tgmm(starts, ends, lhs, dout, static.out_dtype, tm, tk, tn, static.interpret)
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
