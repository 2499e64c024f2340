"""Building blocks shared by InternViT and the decoders: parameters with logical axes, norms, RoPE, the
einsum of activations and weights, and per-layer rematerialisation (attention is `attention.py`)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
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


def dense(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` of activations x and a weight (or attention values) w, in x's dtype (on the CPU
  through a float32 result: `backend.wide_products`)."""
  if not backend.wide_products():
    return jnp.einsum(spec, x, w.astype(x.dtype))
  return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


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
