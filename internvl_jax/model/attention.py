"""Attention: one entry point for the model (`attention`), one XLA implementation (`xla_attention`), and the
KV-cache form generation uses (`cached_attention`, with `cache_view`). The Pallas flash kernels of
`kernels/` and cuDNN plug in behind `attention`; `kernels.reference_attention` stays the reference that
the kernels (and this XLA path, in tests) are checked against.

Under a Mesh (`jax.set_mesh`) the Pallas kernels run per shard through `shard_map`: batch over the batch
axes, heads over 'tensor' when both query and kv heads divide it. The XLA path is left to GSPMD.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.sharding import PartitionSpec as P

from internvl_jax.config import KernelConfig
from internvl_jax.model import backend
from internvl_jax.model.layers import dense

NEG_INF = float(jnp.finfo(jnp.float32).min)


def attention(q, k, v, *, causal: bool, segment_ids=None, sliding_window: int | None = None, sinks=None,
              kernels_cfg: KernelConfig = KernelConfig()):
  """q [b, t, n, h], k/v [b, s, kv, h] (n % kv == 0) -> [b, t, n, h]. segment_ids [b, t] (t == s): tokens
  attend within their segment, never to segment 0 (padding); causal or bidirectional; sliding_window: a
  query sees the `sliding_window` keys ending at its own position; sinks [n]: one extra logit per head in
  the softmax's denominator (GPT-OSS)."""
  impl = backend.attention_impl(kernels_cfg)
  if impl == "xla":
    mask = attention_mask(segment_ids, q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window)
    return xla_attention(q, k, v, mask, sinks=sinks)
  if impl == "cudnn":
    if sinks is not None:
      raise ValueError("attention_impl='cudnn' has no attention sinks; use 'pallas' or 'xla'")
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window - 1)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")
  kw = dict(causal=causal, sliding_window=sliding_window, **backend.kernel_backend(kernels_cfg))
  mesh = jax.sharding.get_abstract_mesh()
  batch = None if mesh.empty else backend.batch_axes(q.shape[0], mesh)
  heads = backend.heads_axis(q.shape[2], k.shape[2])
  spec = P(batch, None, heads, None)
  args, specs = [q, k, v], [spec, spec, spec]
  if segment_ids is not None:
    args.append(segment_ids)
    specs.append(P(batch, None))
  if sinks is not None:
    args.append(sinks)
    specs.append(P(heads))

  def run(q, k, v, *rest):
    rest = list(rest)
    seg = rest.pop(0) if segment_ids is not None else None
    return backend.flash_attention(q, k, v, segment_ids=seg, sinks=rest.pop(0) if rest else None, **kw)

  return backend.per_shard(run, tuple(args), tuple(specs), spec)


def attention_mask(segment_ids, t: int, s: int, *, causal: bool, sliding_window: int | None = None):
  """[b or 1, t, s] (True = attend), or None when every query sees every key. Queries are the last t of the
  s positions; with segment_ids [b, t] (t == s) keys must share the query's non-zero segment."""
  if segment_ids is None and not causal and sliding_window is None:
    return None
  back = jnp.arange(s - t, s)[:, None] - jnp.arange(s)[None, :]  # how far behind the query each key sits
  keep = back >= 0 if causal else jnp.ones((t, s), bool)
  if sliding_window is not None:
    keep = keep & (back < sliding_window) & (causal | (-back < sliding_window))
  keep = keep[None]
  if segment_ids is not None:
    keep = keep & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
  return keep


def xla_attention(q, k, v, mask=None, *, scale: float | None = None, sinks=None):
  """Softmax attention in XLA: q [b, t, n, h], k/v [b, s, kv, h], mask [b, t, s] (True = attend) or None,
  sinks [n] or None -> [b, t, n, h]. Softmax in float32; grouped-query attention without repeating K/V."""
  return _attend(q, rearrange(k, "b s k h -> b k h s"), rearrange(v, "b s k h -> b k s h"), mask, scale, sinks)


def _attend(q, k, v, mask, scale, sinks):
  """The implementation, on keys [b, kv, h, s] and values [b, kv, s, h] (the KV cache's layout: each
  product contracts the second-to-last dimension and runs along the last, ~2x faster on XLA:CPU)."""
  if q.shape[2] % k.shape[1]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[1]} kv heads")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  if q.shape[1] > 1 and sinks is None and backend.headwise_pays():
    return _headwise(q, k, v, mask, scale)
  return _grouped(q, k, v, mask, scale, sinks)


def _grouped(q, k, v, mask, scale, sinks=None):
  """All heads at once. Queries as rows [b, kv, t*g, h]: XLA:CPU then runs bfloat16 products on its fast
  path (with a separate t dimension it falls back to a dot with no bfloat16 x bfloat16 -> float32 kernel)."""
  b, t, n, h = q.shape
  kv = k.shape[1]
  g = n // kv
  qg = rearrange(q, "b t (k g) h -> b k (t g) h", k=kv)
  logits = jnp.einsum("bkqh,bkhs->bkqs", qg, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(jnp.repeat(mask, g, axis=1)[:, None], logits, NEG_INF)
  if sinks is None:
    probs = jax.nn.softmax(logits, axis=-1)
  else:  # the sink joins the denominator only
    sink = jnp.tile(sinks.astype(jnp.float32).reshape(kv, g), (1, t))[None, :, :, None]
    m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    e = jnp.exp(logits - m)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))
  out = dense("bkqs,bksh->bkqh", probs.astype(q.dtype), v)
  return rearrange(out, "b k (t g) h -> b t (k g) h", t=t)


def _headwise(q, k, v, mask, scale):
  """`_grouped`, one (row, kv head) at a time under lax.map (the CPU form, `backend.headwise_pays`): one
  head's [g*t, s] logits stay in cache through max, exp, sum and the value product, where the batched
  form streams all heads' logits through memory once per pass."""
  b, t, n, h = q.shape
  kv, s = k.shape[1], k.shape[3]
  g = n // kv
  qs = rearrange(q, "b t (k g) h -> (b k) (g t) h", k=kv)
  ks = rearrange(k, "b k h s -> (b k) s h")
  vs = rearrange(v, "b k s h -> (b k) s h")
  masks = None if mask is None else rearrange(jnp.broadcast_to(mask[:, None], (b, kv, t, s)), "b k t s -> (b k) t s")

  def one(args):
    qi, ki, vi, mi = args
    logits = jnp.einsum("qh,sh->qs", qi, ki, preferred_element_type=jnp.float32) * scale
    if mi is not None:
      logits = jnp.where(jnp.tile(mi, (g, 1)), logits, NEG_INF)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("qs,sh->qh", e.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(q.dtype)

  out = jax.lax.map(one, (qs, ks, vs, masks))
  return rearrange(out, "(b k) (g t) h -> b t (k g) h", b=b, g=g)


# ------------------------------------------------------------------------------------------ the KV cache

def cache_view(cache, segment_ids, span=None, fresh: bool = False):
  """Where t new tokens go in the cache and what each may attend to: slots index..index+t-1 (rows, slots
  [b, t] for the scatter), the cache's validity after writing (padding stays invalid), and the mask
  [b, t, S]: valid slots at or before the query's own slot. span (static): attention reads only slots
  [0, span), which must hold every valid slot. fresh (static): the cache holds nothing yet (a prefill), so
  the new tokens may attend among themselves through `attention` (the Pallas kernels on TPU/GPU)."""
  b, t = segment_ids.shape
  size = cache["valid"].shape[1]
  slots = cache["index"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  valid = cache["valid"].at[rows, slots].set(segment_ids != 0)
  mask = valid[:, None, :] & (jnp.arange(size)[None, None, :] <= slots[:, :, None])
  return {"rows": rows, "slots": slots, "valid": valid, "mask": mask, "span": span or size,
          "index": cache["index"], "old_valid": cache["valid"], "segment_ids": segment_ids, "fresh": fresh}


def _write(kv, k, v, rows, slots):
  k_cache, v_cache = kv
  k_cache = k_cache.at[rows, :, :, slots].set(backend.to_storage(k, k_cache.dtype), mode="drop")
  v_cache = v_cache.at[rows, :, slots].set(backend.to_storage(v, v_cache.dtype), mode="drop")
  return k_cache, v_cache


def cached_attention(q, k, v, kv, view, *, window: int | None = None, sinks=None,
                     kernels_cfg: KernelConfig = KernelConfig()):
  """New queries, keys and values [b, t, heads, h] against a layer's cache kv = (keys [b, kv, h, S], values
  [b, kv, S, h], elements as `backend.kv_storage` keeps them) -> (out [b, t, n, h], the updated (keys,
  values)). A full layer writes k, v at the view's slots and attends over the first `span` slots; a
  sliding layer (`window`) keeps a ring of `window` slots (`ring_attention`). On a fresh cache with the
  Pallas kernels in use, the new tokens attend among themselves through `attention` instead (the same
  keys: nothing else is valid yet)."""
  if view["fresh"] and backend.attention_impl(kernels_cfg) != "xla":
    out = attention(q, k, v, causal=True, segment_ids=view["segment_ids"], sliding_window=window, sinks=sinks,
                    kernels_cfg=kernels_cfg)
    return out, (ring_write(kv, k, v, view) if window else _write(kv, k, v, view["rows"], view["slots"]))
  if window:
    return ring_attention(q, k, v, kv, view, window, sinks)
  k_cache, v_cache = _write(kv, k, v, view["rows"], view["slots"])
  span = view["span"]
  out = _attend(q, backend.from_storage(k_cache[..., :span], q.dtype),
                backend.from_storage(v_cache[:, :, :span], q.dtype), view["mask"][:, :, :span], None, sinks)
  return out, (k_cache, v_cache)


def ring_attention(q, k, v, kv, view, window: int, sinks=None):
  """A sliding-window layer whose cache is a ring of `window` slots: ring slot j holds the latest token whose
  cache slot s has s % window == j. The new queries attend to the ring's tokens from before this write and
  to the new keys, each key kept when valid and fewer than `window` slots behind the query; then
  `ring_write` stores the new tokens."""
  k_ring, v_ring = kv
  w = k_ring.shape[-1]
  if w != window:
    raise ValueError(f"a sliding layer's ring holds {w} slots for a window of {window}")
  index = view["index"][:, None]
  held = index - 1 - jnp.mod(index - 1 - jnp.arange(w)[None], w)  # [b, w]: the cache slot each ring slot holds
  held_valid = (held >= 0) & jnp.take_along_axis(view["old_valid"], jnp.maximum(held, 0), axis=1)
  keys_at = jnp.concatenate([held, view["slots"]], axis=1)  # [b, w + t]
  keys_ok = jnp.concatenate([held_valid, view["segment_ids"] != 0], axis=1)
  back = view["slots"][:, :, None] - keys_at[:, None, :]
  mask = keys_ok[:, None, :] & (back >= 0) & (back < window)
  keys = jnp.concatenate([backend.from_storage(k_ring, q.dtype), rearrange(k, "b t k h -> b k h t")], axis=-1)
  values = jnp.concatenate([backend.from_storage(v_ring, q.dtype), rearrange(v, "b t k h -> b k t h")], axis=2)
  return _attend(q, keys, values, mask, None, sinks), ring_write(kv, k, v, view)


def ring_write(kv, k, v, view):
  """Writes the last `window` valid new tokens into the ring: earlier ones would be overwritten within this
  same write (a scatter with repeated slots has no defined order), and padding must not evict tokens that a
  later query's window still holds."""
  w = kv[0].shape[-1]
  new = view["segment_ids"] != 0
  written = jnp.sum(new, axis=1, keepdims=True)
  keep = new & (jnp.arange(new.shape[1])[None] >= written - w)
  return _write(kv, k, v, view["rows"], jnp.where(keep, jnp.mod(view["slots"], w), w))  # w: dropped

