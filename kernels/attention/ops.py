"""Flash attention: the public API, its custom_vjp, and the dispatch to a backend. The block math both
backends share, and the pure-JAX reference, are in common.py.

`flash_attention(q, k, v, *, causal, ...)` takes the layout of `jax.nn.dot_product_attention`
(q [b, t, n, d]; k, v [b, s, kv, d]) and runs one of:
  'tpu'       Pallas Mosaic kernels (tpu.py): KV streamed along a grid axis, VMEM scratch.
  'gpu'       Pallas Triton kernels (gpu.py): one program per query block, loop over KV.
  'reference' `reference_attention` in common.py (XLA).
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

import jax
import jax.numpy as jnp

from kernels.attention.common import NEG, BlockSizes, Static, _segments, _window, reference_attention
from kernels.attention.gpu import backward as gpu_backward, forward as gpu_forward
from kernels.attention.tpu import backward as tpu_backward, forward as tpu_forward
from kernels.platform import check_runnable, resolve_backend


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


_FORWARD = {"tpu": tpu_forward, "gpu": gpu_forward}  # the kernels of each backend
_BACKWARD = {"tpu": tpu_backward, "gpu": gpu_backward}


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
  out, lse = _FORWARD[static.backend](qt, kt, vt, qs, ks, sink_arr, static, bq, bk)
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
  dq, dk, dv = _BACKWARD[static.backend](qt, kt, vt, dot_, lse_p, delta, qs, ks, static, bq, bk)
  dq = dq[:, :, :static.t].transpose(0, 2, 1, 3).astype(q.dtype)
  dk = dk[:, :, :static.s].transpose(0, 2, 1, 3).astype(k.dtype)
  dv = dv[:, :, :static.s].transpose(0, 2, 1, 3).astype(v.dtype)
  dsinks = None
  if sinks is not None:  # d/d sink of log-sum-exp is p_sink = exp(sink - lse); the sink carries no value
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse[..., 0])
    dsinks = -jnp.sum(p_sink * delta[:, :, :static.t, 0], axis=(0, 2)).astype(sinks.dtype)
  return dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
