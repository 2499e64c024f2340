"""Flash attention: public API, pure-JAX reference, custom_vjp, and the block math both backends share.

`flash_attention(q, k, v, *, causal, ...)` takes the layout of `jax.nn.dot_product_attention`
(q [b, t, n, d]; k, v [b, s, kv, d]) and runs one of:
  'tpu'       Pallas Mosaic kernels (flash_attention_tpu.py): KV streamed along a grid axis, VMEM scratch.
  'gpu'       Pallas Triton kernels (flash_attention_gpu.py): one program per query block, loop over KV.
  'reference' `reference_attention` below (XLA).
Semantics shared by all three:
  * grouped-query attention: query head h reads kv head h // (n // kv); K/V are never repeated;
  * causal masks are aligned bottom-right (query i sits at key position i + s - t), so t == s is the usual
    lower triangle and t < s is a chunk of queries at the end of the keys (decoding);
  * segment_ids [b, t] (q) / [b, s] (kv), or one [b, t] array when t == s: attend only within equal ids;
  * sliding_window w keeps keys k with q_pos - w < k <= q_pos (with causal), |q_pos - k| < w without;
  * sinks [n]: a per-head logit added to the softmax denominator with no value vector (GPT-OSS,
    REFERENCE.md §9): the running max and sum start from the raw sink logit (not scaled);
  * a query row with no key to attend to returns zeros (and zero gradients), never NaN.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp

from kernels.platform import check_runnable, resolve_backend

NEG = -1e30  # finite "minus infinity": exp(NEG - m) underflows to 0 without inf - inf = NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key block lengths of the forward and backward kernels: upper bounds, shrunk to fit short
  sequences. Triton needs powers of two >= 16; Mosaic multiples of 8, and compiled TPU calls round a key
  block that does not cover the whole key length up to a multiple of 128 (see `_blocks`)."""

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
  tests comparing the kernels with the reference also check the mask semantics (module docstring)."""
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


def _check_kernel(blocks: BlockSizes, backend: str, d: int, interpret: bool):
  sizes = dataclasses.astuple(blocks)
  if backend == "gpu":  # Triton arrays have power-of-two shapes and its dots need dimensions >= 16
    if d & (d - 1) or (d < 16 and not interpret):
      raise ValueError(f"the gpu backend needs a power-of-two head_dim (Triton block shapes; >= 16 when "
                       f"compiled, for its dots), got {d}")
    if any(x < 16 or x & (x - 1) for x in sizes):
      raise ValueError(f"gpu block sizes must be powers of two >= 16, got {blocks}")
  elif any(x < 8 or x % 8 for x in sizes):  # Mosaic tiles the sequence axis of a block by 8
    raise ValueError(f"tpu block sizes must be multiples of 8, got {blocks}")


# ----------------------------------------------------------------------------------------- public API

def flash_attention(q, k, v, *, causal: bool, segment_ids=None, kv_segment_ids=None, sliding_window=None,
                    sinks=None, scale=None, backend: str = "auto", interpret: bool = False,
                    block_sizes: BlockSizes | None = None):
  """Softmax attention: q [b, t, n, d], k/v [b, s, kv, d] -> [b, t, n, d] (see the module docstring)."""
  b, t, n, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or n % k.shape[2]:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need k == v shapes [b, s, kv, d] with n % kv == 0")
  if sinks is not None and sinks.shape != (n,):
    raise ValueError(f"sinks must be [{n}] (one logit per query head), got {sinks.shape}")
  sliding_window = _window(sliding_window)
  backend = resolve_backend(backend)
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  if backend == "reference":
    return reference_attention(q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                               sliding_window=sliding_window, sinks=sinks, scale=scale)
  check_runnable(backend, interpret, "attention")
  block_sizes = block_sizes or BlockSizes()
  _check_kernel(block_sizes, backend, d, interpret)
  q_seg, k_seg = _segments(segment_ids, kv_segment_ids, b, t, k.shape[1])
  static = Static(causal, sliding_window, scale, t, k.shape[1], backend, interpret, block_sizes,
                  q_seg is not None, sinks is not None)
  return _flash(q, k, v, q_seg, k_seg, sinks, static)


def _impl(static: Static):
  if static.backend == "tpu":
    from kernels import flash_attention_tpu as impl
  else:
    from kernels import flash_attention_gpu as impl
  return impl


def _pad(x, axis, multiple):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _prepare(q, k, v, q_seg, k_seg, static: Static, block_q: int, block_kv: int):
  """To the kernels' layout: heads before sequence ([b, n, t, d]), sequences padded to whole blocks."""
  qt = _pad(q.transpose(0, 2, 1, 3), 2, block_q)
  kt = _pad(k.transpose(0, 2, 1, 3), 2, block_kv)
  vt = _pad(v.transpose(0, 2, 1, 3), 2, block_kv)
  if static.has_segments:
    q_seg = _pad(q_seg, 1, block_q)[:, :, None]  # [b, tp, 1]
    k_seg = _pad(k_seg, 1, block_kv)[:, None, :]  # [b, 1, sp]
  return qt, kt, vt, q_seg, k_seg


def _blocks(static: Static, backward: bool):
  """(query block, key block) of a call."""
  bq = static.blocks.block_q_bwd if backward else static.blocks.block_q
  bk = static.blocks.block_kv_bwd if backward else static.blocks.block_kv
  # Never larger than the (padded) sequences need, so short ones stay one block; Triton's dots need >= 16.
  floor = 16 if static.backend == "gpu" else 8
  bq = min(bq, max(floor, pl_next_pow2(static.t)))
  bk = min(bk, max(floor, pl_next_pow2(static.s)))
  if static.backend == "tpu" and not static.interpret and bk < static.s and bk % 128:
    # Mosaic wants the last two dims of a block in multiples of (8, 128) or whole: the key-side segment
    # ids ([b, 1, s]) put the key axis last, so a key block must be a multiple of 128 or all the keys.
    # Interpret mode has no such rule, which lets the tests run several small key blocks.
    bk = -(-bk // 128) * 128
  return bq, bk


def pl_next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _forward(q, k, v, q_seg, k_seg, sinks, static: Static):
  bq, bk = _blocks(static, backward=False)
  qt, kt, vt, qs, ks = _prepare(q, k, v, q_seg, k_seg, static, bq, bk)
  sink_arr = None if sinks is None else sinks.astype(jnp.float32).reshape(-1, 1)
  out, lse = _impl(static).forward(qt, kt, vt, qs, ks, sink_arr, static, bq, bk)
  return out[:, :, :static.t].transpose(0, 2, 1, 3), lse  # lse stays padded, [b, n, tp, 1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, k_seg, sinks, static):
  return _forward(q, k, v, q_seg, k_seg, sinks, static)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, sinks, static):
  out, lse = _forward(q, k, v, q_seg, k_seg, sinks, static)
  return out, (q, k, v, q_seg, k_seg, sinks, out, lse)


def _flash_bwd(static, res, do):
  q, k, v, q_seg, k_seg, sinks, out, lse = res
  bq, bk = _blocks(static, backward=True)
  qt, kt, vt, qs, ks = _prepare(q, k, v, q_seg, k_seg, static, bq, bk)
  dot_ = _pad(do.transpose(0, 2, 1, 3), 2, bq)
  # delta_i = rowsum(dO_i * O_i): the softmax-Jacobian term shared by dq, dk and dsinks.
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)[..., None]
  delta = _pad(delta, 2, bq)
  lse = lse[:, :, :static.t]
  # Padded query rows get lse = +1e30 so their probabilities, and so their gradient contributions, are 0.
  lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, -static.t % bq), (0, 0)), constant_values=-NEG)
  dq, dk, dv = _impl(static).backward(qt, kt, vt, dot_, lse_p, delta, qs, ks, static, bq, bk)
  dq = dq[:, :, :static.t].transpose(0, 2, 1, 3).astype(q.dtype)
  dk = dk[:, :, :static.s].transpose(0, 2, 1, 3).astype(k.dtype)
  dv = dv[:, :, :static.s].transpose(0, 2, 1, 3).astype(v.dtype)
  dsinks = None
  if sinks is not None:  # d/d sink of log-sum-exp is p_sink = exp(sink - lse); the sink carries no value
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse[..., 0])
    dsinks = -jnp.sum(p_sink * delta[:, :, :static.t, 0], axis=(0, 2)).astype(sinks.dtype)
  return dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
