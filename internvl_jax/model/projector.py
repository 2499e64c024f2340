"""The "MLP" of ViT-MLP-LLM (`mlp1`, REFERENCE.md §2.4-2.5): LayerNorm(eps 1e-5) -> Linear -> exact
GELU -> Linear, mapping pixel-shuffled ViT features to the LLM width; and `extract_feature`."""
from __future__ import annotations

import jax
from flax import nnx

from internvl_jax.model.layers import LayerNorm, dense, gelu, param
from internvl_jax.model.pixel_shuffle import pixel_shuffle


class MLPProjector(nnx.Module):

  def __init__(self, in_dim: int, out_dim: int, *, param_dtype, rngs: nnx.Rngs):
    self.norm = LayerNorm(in_dim, 1e-5, axes=("mlp",), param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = param(rngs, (in_dim, out_dim), ("mlp", "embed"), param_dtype)
    self.bias_1 = param(rngs, (out_dim,), ("embed",), param_dtype, "zeros")
    self.linear_2 = param(rngs, (out_dim, out_dim), ("mlp", "embed"), param_dtype)
    self.bias_2 = param(rngs, (out_dim,), ("embed",), param_dtype, "zeros")

  @jax.named_scope("mlp_projector")
  def __call__(self, x):
    dt = x.dtype
    h = dense("tnc,cd->tnd", self.norm(x), self.linear_1[...]) + self.bias_1[...].astype(dt)
    return dense("tnc,cd->tnd", gelu(h), self.linear_2[...]) + self.bias_2[...].astype(dt)


def extract_feature(vit_hidden, projector, downsample_ratio: float):
  """ViT hidden states [tiles, 1 + g*g, Dv] -> LLM-ready features [tiles, (g*ratio)^2, Dl], through `projector`
  (`mlp1`, or the Flash model's `mlp2` at ratio 0.25)."""
  t, n, dv = vit_hidden.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ValueError(f"vision tokens {n - 1} per tile do not form a square grid")
  x = pixel_shuffle(vit_hidden[:, 1:].reshape(t, g, g, dv), downsample_ratio)
  return projector(x.reshape(t, -1, x.shape[-1]))
