"""Building blocks shared by InternViT and the decoders: parameters with logical axes, norms, RoPE, the
einsum of activations and weights, and per-layer rematerialisation (attention is `attention.py`)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.model import backend

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
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then times the weight (Qwen3,
  InternViT). weight_in_float32 (GPT-OSS): times the weight in float32, then cast — transformers' two norms
  differ only in this order, which matters in bfloat16."""

  def __init__(self, dim: int, eps: float, *, axes=("embed",), param_dtype, rngs: nnx.Rngs,
               weight_in_float32: bool = False):
    self.eps, self.weight_in_float32 = eps, weight_in_float32
    self.weight = param(rngs, (dim,), axes, param_dtype, init="ones")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.weight_in_float32:
      return (self.weight[...].astype(jnp.float32) * x32).astype(x.dtype)
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


def dense(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` of activations x and a weight (or attention values) w, in x's dtype (on the CPU
  through a float32 result: `backend.wide_products`)."""
  if not backend.wide_products():
    return jnp.einsum(spec, x, w.astype(x.dtype))
  return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def gelu(x):
  """Exact (erf) GELU, as nn.GELU() and ACT2FN['gelu'] in the reference."""
  return jax.nn.gelu(x, approximate=False)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim // 2] float32, cos/sin factor). scaling: a `config.RopeScaling` (YaRN, as
  transformers' `_compute_yarn_parameters`: extrapolated frequencies for the fast dimensions, interpolated
  (/factor) for the slow ones, a linear ramp between the correction dimensions of beta_fast and beta_slow
  rotations over the original context) or None (plain RoPE, factor 1)."""
  base = theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  inv_freq = (1.0 / base).astype(np.float32)
  if scaling is None:
    return inv_freq, 1.0
  if scaling.rope_type != "yarn":
    raise ValueError(f"unknown rope scaling {scaling.rope_type!r} (expected 'yarn')")
  f, orig = scaling.factor, scaling.original_max_position_embeddings

  def dim_of(rotations):  # the dimension whose wavelength makes `rotations` turns over the original context
    return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolate = 1 - ramp
  inv_freq = (1.0 / (f * base)) * (1 - extrapolate) + inv_freq * extrapolate
  factor = scaling.attention_factor
  if factor is None:
    factor = 0.1 * math.log(f) + 1.0 if f > 1 else 1.0
  return inv_freq.astype(np.float32), float(factor)


def rope(x, positions, theta: float, scaling=None):
  """Rotary embedding (rotate-half convention) on x [b, t, heads, head_dim] at positions [b, t]; scaling:
  see `rope_frequencies`."""
  inv_freq, factor = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


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
