"""Building blocks shared by InternViT and the decoders: parameters with logical axes, norms, RoPE,
and the XLA attention path (the Pallas kernels of `kernels/` plug in behind `attention`)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = float(jnp.finfo(jnp.float32).min)


class Keys:
  """Per-parameter init keys fold_in(base, i), drawn from one nnx.Rngs draw.

  An nnx.Rngs stream costs ~10 ms per draw under tracing, which made the abstract init of the 241B
  preset take many seconds; folding in a counter costs ~0.1 ms.
  """

  def __init__(self, rngs: nnx.Rngs):
    self.base, self.count = rngs.params(), 0

  def params(self):
    self.count += 1
    return jax.random.fold_in(self.base, self.count)


def param(rngs: nnx.Rngs | Keys, shape: Sequence[int], axes: Sequence[str | None], dtype, init="normal",
          scale: float = 0.02) -> nnx.Param:
  """A parameter carrying its logical axis names (`sharding.py` maps them onto the mesh)."""
  shape = tuple(shape)
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for shape {shape}")
  if init == "normal":
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  elif init == "const":
    value = jnp.full(shape, scale, jnp.float32)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then times the weight."""

  def __init__(self, dim: int, eps: float, *, axes=("embed",), param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, (dim,), axes, param_dtype, init="ones")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with affine weight and bias, statistics in float32."""

  def __init__(self, dim: int, eps: float, *, axes=("embed",), param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, (dim,), axes, param_dtype, init="ones")
    self.bias = param(rngs, (dim,), axes, param_dtype, init="zeros")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def make_norm(kind: str, dim: int, eps: float, *, param_dtype, rngs, axes=("embed",)):
  if kind == "layer_norm":
    return LayerNorm(dim, eps, axes=axes, param_dtype=param_dtype, rngs=rngs)
  if kind == "rms_norm":
    return RMSNorm(dim, eps, axes=axes, param_dtype=param_dtype, rngs=rngs)
  raise ValueError(f"unknown norm_type {kind!r} (expected 'layer_norm' or 'rms_norm')")


def wide_products() -> bool:
  """Whether products ask for a float32 result and cast it back: on the CPU, where that is the only form in
  which XLA runs a bfloat16 product on AVX512-BF16 instructions (twice its float32 rate; asked for a bfloat16
  result it converts and runs at the float32 rate, WORKSPACE.md, Inference). Accelerators accumulate in
  float32 inside the product anyway, and there the product's output keeps the activation dtype, so a remat
  policy that saves dot outputs saves them at that width."""
  return jax.default_backend() == "cpu"


def dense(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` of activations x and a weight (or attention values) w, in x's dtype (see
  `wide_products`)."""
  if not wide_products():
    return jnp.einsum(spec, x, w.astype(x.dtype))
  return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def kv_storage(dtype):
  """The KV cache's element type for a compute dtype: 16-bit floats are stored as their uint16 bit patterns.
  XLA:CPU runs a bfloat16 scatter or dynamic_update_slice in float32, converting the whole cache there and
  back on every decode step (~40 ms per layer at batch 8); on uint16 the write stays in place."""
  return jnp.dtype(jnp.uint16) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def to_storage(x, storage):
  """Values in the compute dtype -> the cache's element type (`kv_storage`)."""
  return jax.lax.bitcast_convert_type(x, storage) if storage == jnp.uint16 else x.astype(storage)


def from_storage(x, dtype):
  """Cache elements -> values in the compute dtype `dtype`."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x.astype(dtype)


def gelu(x):
  """Exact (erf) GELU, as nn.GELU() and ACT2FN['gelu'] in the reference."""
  return jax.nn.gelu(x, approximate=False)


def rope(x, positions, theta: float):
  """Rotary embedding (rotate-half convention) on x [b, t, heads, head_dim] at positions [b, t]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def masked_attention(q, k, v, mask=None, scale: float | None = None):
  """q [b, t, n, h], k/v [b, s, kv, h] with n % kv == 0, mask [b, t, s] (True = attend) or None ->
  [b, t, n, h]. Plain XLA; grouped-query attention without repeating K/V; softmax in float32."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  if n % kv:
    raise ValueError(f"{n} query heads are not a multiple of {kv} kv heads")
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return dense("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def headwise_attention(q, k, v, mask=None, scale: float | None = None):
  """masked_attention, one (row, kv head) at a time under lax.map. Same inputs and result.

  On the CPU this is ~4x faster for long sequences (InternViT's 1,025 tokens: 29 vs 122 ms per layer):
  one head's [g*t, s] logits stay in cache through max, exp, sum and the value product, where the batched
  form streams all heads' logits through memory once per pass. On accelerators the flash kernels run.
  """
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  if n % kv:
    raise ValueError(f"{n} query heads are not a multiple of {kv} kv heads")
  g = n // kv
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  qs = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, h)
  ks = k.transpose(0, 2, 1, 3).reshape(b * kv, s, h)
  vs = v.transpose(0, 2, 1, 3).reshape(b * kv, s, h)
  masks = None if mask is None else jnp.broadcast_to(mask[:, None], (b, kv, t, s)).reshape(b * kv, t, s)

  def one(args):
    qi, ki, vi, mi = args
    logits = jnp.einsum("qh,sh->qs", qi, ki, preferred_element_type=jnp.float32) * scale
    if mi is not None:
      logits = jnp.where(jnp.tile(mi, (g, 1)), logits, NEG_INF)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("qs,sh->qh", e.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(q.dtype)

  out = jax.lax.map(one, (qs, ks, vs, masks))  # [b*kv, g*t, h]
  return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def cached_attention(q, k_cache, v_cache, mask):
  """Attention of new queries q [b, t, n, h] over a KV cache, keys [b, kv, h, S] and values [b, kv, S, h]
  (elements as `kv_storage` keeps them), with mask [b, t, S]."""
  b, t, n, h = q.shape
  k_cache, v_cache = from_storage(k_cache, q.dtype), from_storage(v_cache, q.dtype)
  if t > 1 and headwise_pays():  # a prefill
    return headwise_attention(q, k_cache.transpose(0, 3, 1, 2), v_cache.transpose(0, 2, 1, 3), mask)
  kv = k_cache.shape[1]
  g = n // kv
  # queries as rows [b, kv, t*g, h]: XLA:CPU then runs the bfloat16 products on its fast path (with a
  # separate t dimension it falls back to a dot that has no bfloat16 x bfloat16 -> float32 kernel)
  qg = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, h)
  logits = jnp.einsum("bkqh,bkhs->bkqs", qg, k_cache, preferred_element_type=jnp.float32)
  logits = jnp.where(jnp.repeat(mask, g, axis=1)[:, None], logits / math.sqrt(h), NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  out = dense("bkqs,bksh->bkqh", probs, v_cache)
  return out.reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def headwise_pays() -> bool:
  """headwise_attention on the CPU without a mesh; under a mesh the batched form lets GSPMD shard heads."""
  return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def xla_attention(q, k, v, *, causal: bool, segment_ids=None, scale: float | None = None):
  """Causal or bidirectional attention in XLA. With segment_ids [b, t] (t == s), tokens attend within
  their segment and segment 0 (padding) is never attended to."""
  t, s = q.shape[1], k.shape[1]
  mask = None
  if segment_ids is not None:
    mask = decoder_mask(segment_ids, causal)
  elif causal:
    mask = jnp.tril(jnp.ones((t, s), bool), s - t)[None]
  if headwise_pays():
    return headwise_attention(q, k, v, mask, scale)
  return masked_attention(q, k, v, mask, scale)


def decoder_mask(segment_ids, causal: bool = True):
  """[b, t, t]: (causal and) equal, non-zero segment ids (0 marks padding).

  Queries on padding attend to nothing useful, but never yield NaN (masked logits are finite).
  """
  t = segment_ids.shape[1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  valid = (segment_ids != 0)[:, None, :]
  mask = same & valid
  return mask & jnp.tril(jnp.ones((t, t), bool))[None] if causal else mask


def remat_policy(name: str):
  """'full' recomputes the whole layer in the backward pass; 'save_dots' keeps its matmul outputs."""
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "save_dots":
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  raise ValueError(f"unknown remat policy {name!r} (expected 'none', 'full' or 'save_dots')")


def call_layer(layer: nnx.Module, remat: str, *args):
  """layer(*args), rematerialised per layer under the given policy."""
  if remat == "none":
    return layer(*args)
  return nnx.remat(lambda m, *a: m(*a), policy=remat_policy(remat))(layer, *args)
