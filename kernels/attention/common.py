"""Flash attention: the block math both backends share (masks, block ranges, online softmax, backward step),
the block sizes and static call description, and the pure-JAX reference with its dense mask.

The semantics all of these implement are in the docstring of `kernels/attention/ops.py`. Imports nothing
from `tpu.py`, `gpu.py` or `ops.py`, which all import this module.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": exp(NEG - m) underflows to 0 without inf - inf = NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key block lengths of the forward and backward kernels: upper bounds, shrunk to fit short
  sequences. Triton needs powers of two >= 16; Mosaic multiples of 8, and compiled TPU calls round a key
  block that does not cover the whole key length up to a multiple of 128 (see `_blocks` in ops.py)."""

  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int = 128
  block_kv_bwd: int = 128


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything about a call that is not an array: hashable, a static argument of the custom_vjp."""

  causal: bool
  window: int | None
  scale: float
  t: int  # unpadded query length
  s: int  # unpadded key length
  backend: str
  interpret: bool
  blocks: BlockSizes
  has_segments: bool
  has_sinks: bool

  @property
  def offset(self) -> int:
    return self.s - self.t


# ----------------------------------------------------------------------------------------- shared block math

def block_mask(static: Static, q_idx, k_idx, q_seg=None, k_seg=None):
  """Boolean [bq, bk] mask from query indices q_idx [bq, 1] and key indices k_idx [1, bk]."""
  mask = k_idx < static.s
  q_pos = q_idx + static.offset
  if static.causal:
    mask = mask & (k_idx <= q_pos)
  if static.window is not None:
    mask = mask & (k_idx > q_pos - static.window)
    if not static.causal:
      mask = mask & (k_idx < q_pos + static.window)
  if q_seg is not None:
    mask = mask & (q_seg == k_seg)
  return mask


def kv_block_range(static: Static, q_start, block_q: int, block_kv: int, num_kv_blocks: int):
  """[lower, upper) key blocks a query block can see: causality and the window skip the rest."""
  lower, upper = 0, num_kv_blocks
  if static.causal:
    upper = jnp.minimum(num_kv_blocks, (q_start + block_q - 1 + static.offset) // block_kv + 1)
  if static.window is not None:
    lower = jnp.maximum(0, (q_start + static.offset - static.window + 1) // block_kv)
    if not static.causal:
      upper = jnp.minimum(num_kv_blocks, (q_start + block_q - 1 + static.offset + static.window - 1) // block_kv + 1)
  return lower, upper


def q_block_range(static: Static, k_start, block_kv: int, block_q: int, num_q_blocks: int):
  """[lower, upper) query blocks that can see a key block (the transpose of kv_block_range)."""
  lower, upper = 0, num_q_blocks
  if static.causal:  # q_pos >= k  <=>  q >= k - offset
    lower = jnp.maximum(0, (k_start - static.offset) // block_q)
  if static.window is not None:  # q_pos < k + window  <=>  q <= k_end + window - 1 - offset
    upper = jnp.minimum(num_q_blocks, (k_start + block_kv - 1 + static.window - 1 - static.offset) // block_q + 1)
    if not static.causal:
      lower = jnp.maximum(0, (k_start - static.window + 1 - static.offset) // block_q)
  return lower, upper


def online_softmax_step(static: Static, q, k, v, mask, m, l, acc):
  """One key block of the forward pass: running max m [bq, 1], sum l [bq, 1], accumulator acc [bq, d]."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * static.scale
  s = jnp.where(mask, s, NEG)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
  return m_new, l, acc


def finish(m, l, acc):
  """-> (output [bq, d] float32, log-sum-exp [bq, 1]); rows that saw nothing give 0 and lse = +1e30."""
  seen = l > 0
  out = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0)
  return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -NEG)


def backward_step(static: Static, q, k, v, do, lse, delta, mask):
  """One (query block, key block) pair of the backward pass -> (ds [bq, bk] float32, p [bq, bk] float32)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * static.scale
  p = jnp.where(mask, jnp.exp(s - lse), 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return p * (dp - delta), p


# ----------------------------------------------------------------------------------------- reference

def reference_attention(q, k, v, *, causal: bool, segment_ids=None, kv_segment_ids=None, sliding_window=None,
                        sinks=None, scale=None):
  """Plain XLA attention with the same semantics (materialises [b, n, t, s] logits)."""
  b, t, n, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  q_seg, k_seg = _segments(segment_ids, kv_segment_ids, b, t, s)
  mask = dense_mask(t, s, causal=causal, window=_window(sliding_window), q_seg=q_seg, k_seg=k_seg)[:, None, None]
  qg = q.reshape(b, t, kv, n // kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, NEG)
  m = jnp.max(logits, axis=-1, keepdims=True)
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, kv, n // kv, 1, 1)
    m = jnp.maximum(m, sink)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if sinks is not None:
    denom = denom + jnp.exp(sink - m)
  p = jnp.where(denom > 0, p / jnp.where(denom > 0, denom, 1.0), 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, d).astype(q.dtype)


def dense_mask(t: int, s: int, *, causal: bool, window: int | None, q_seg=None, k_seg=None):
  """[b or 1, t, s] boolean mask written from positions, apart from the kernels' `block_mask`, so that the
  tests comparing the kernels with the reference also check the mask semantics (the docstring of ops.py)."""
  q_pos = jnp.arange(s - t, s)[:, None]  # queries are the last t positions of the keys
  back = q_pos - jnp.arange(s)[None, :]  # how far behind the query each key sits (< 0: ahead of it)
  keep = jnp.ones((t, s), bool)
  if causal:
    keep = back >= 0
  if window is not None:
    keep = keep & (back < window) & (causal | (-back < window))
  keep = keep[None]
  if q_seg is not None:
    keep = keep & (q_seg[:, :, None] == k_seg[:, None, :])
  return keep


def _segments(segment_ids, kv_segment_ids, b, t, s):
  if segment_ids is None:
    if kv_segment_ids is not None:
      raise ValueError("kv_segment_ids given without segment_ids")
    return None, None
  if segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [batch, seq_q] = {(b, t)}, got {segment_ids.shape}")
  if kv_segment_ids is None:
    if t != s:
      raise ValueError(f"segment_ids alone needs seq_q == seq_kv, got {t} and {s}; pass kv_segment_ids")
    kv_segment_ids = segment_ids
  if kv_segment_ids.shape != (b, s):
    raise ValueError(f"kv_segment_ids must be [batch, seq_kv] = {(b, s)}, got {kv_segment_ids.shape}")
  return segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def _window(window):
  """A positive Python int (it is static: part of the kernels' masks), or None."""
  if window is None:
    return None
  try:
    ok = not isinstance(window, bool) and operator.index(window) > 0
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"sliding_window must be a positive int, got {window!r}")
  return int(window)
