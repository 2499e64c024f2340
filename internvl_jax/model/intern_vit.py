"""InternViT-300M / InternViT-6B: the "ViT" of ViT-MLP-LLM (REFERENCE.md §1).

Pre-norm transformer with layer scale and drop path; a class token and learned absolute position
embeddings (bicubically interpolated when a tile is not `image_size` pixels). Returns every token of the
selected layer, class token first; `projector.extract_feature` drops it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from internvl_jax.config import KernelConfig, VisionConfig
from internvl_jax.model import attention
from internvl_jax.model.layers import call_layer, dense, gelu, make_norm, param
from internvl_jax.sharding import constrain


@functools.lru_cache(maxsize=32)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bicubic interpolation (A = -0.75, align_corners=False,
  borders clamped), so that resizing is two matmuls and matches F.interpolate exactly."""
  a = -0.75

  def cubic(d):
    d = abs(d)
    if d <= 1:
      return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
      return (((d - 5) * d + 8) * d - 4) * a
    return 0.0

  w = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      w[i, min(max(base + k, 0), n_in - 1)] += cubic(k - t)
  return w.astype(np.float32)


def resize_pos_embed(grid_pos, height: int, width: int):
  """Bicubic resize of the [g, g, D] position grid to [height, width, D], in float32."""
  g_h, g_w, _ = grid_pos.shape
  if (g_h, g_w) == (height, width):
    return grid_pos
  rows = jnp.asarray(bicubic_matrix(g_h, height))
  cols = jnp.asarray(bicubic_matrix(g_w, width))
  out = jnp.einsum("hi,ijd,wj->hwd", rows, grid_pos.astype(jnp.float32), cols,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid_pos.dtype)


def drop_path(x, rate: float, rng):
  """Stochastic depth (timm DropPath): zero whole samples with probability `rate`, rescale the rest."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class InternViTAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    self.cfg, self.kernels_cfg = cfg, kernels_cfg
    self.qkv = param(rngs, (d, 3, n, h), ("embed", None, "heads", "head_dim"), param_dtype)
    self.qkv_bias = param(rngs, (3, n, h), (None, "heads", "head_dim"), param_dtype, "zeros") if cfg.qkv_bias else None
    if cfg.qk_norm:  # over the full width (all heads jointly), not per head
      self.q_norm = make_norm("rms_norm", d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
      self.k_norm = make_norm("rms_norm", d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    self.proj_bias = param(rngs, (d,), ("embed",), param_dtype, "zeros")

  @jax.named_scope("attention")
  def __call__(self, x):
    dt = x.dtype
    qkv = dense("btd,dsnh->btsnh", x, self.qkv[...])
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.cfg.qk_norm:  # over all heads jointly
      n = q.shape[2]
      q = rearrange(self.q_norm(rearrange(q, "b t n h -> b t (n h)")), "b t (n h) -> b t n h", n=n)
      k = rearrange(self.k_norm(rearrange(k, "b t n h -> b t (n h)")), "b t (n h) -> b t n h", n=n)
    out = attention.attention(q, k, v, causal=False, kernels_cfg=self.kernels_cfg)
    return dense("btnh,nhd->btd", out, self.proj[...]) + self.proj_bias[...].astype(dt)


class InternViTLayer(nnx.Module):

  def __init__(self, cfg: VisionConfig, drop_rate: float, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(),
               rngs: nnx.Rngs):
    d, i = cfg.hidden_size, cfg.intermediate_size
    self.drop_rate = drop_rate
    self.norm1 = make_norm(cfg.norm_type, d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = InternViTAttention(cfg, param_dtype=param_dtype, kernels_cfg=kernels_cfg, rngs=rngs)
    self.ls1 = param(rngs, (d,), ("embed",), param_dtype, "const", cfg.layer_scale_init)
    self.norm2 = make_norm(cfg.norm_type, d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = param(rngs, (d, i), ("embed", "mlp"), param_dtype)
    self.fc1_bias = param(rngs, (i,), ("mlp",), param_dtype, "zeros")
    self.fc2 = param(rngs, (i, d), ("mlp", "embed"), param_dtype)
    self.fc2_bias = param(rngs, (d,), ("embed",), param_dtype, "zeros")
    self.ls2 = param(rngs, (d,), ("embed",), param_dtype, "const", cfg.layer_scale_init)

  @jax.named_scope("mlp")
  def mlp(self, x):
    dt = x.dtype
    h = gelu(dense("btd,di->bti", x, self.fc1[...]) + self.fc1_bias[...].astype(dt))
    return dense("bti,id->btd", h, self.fc2[...]) + self.fc2_bias[...].astype(dt)

  @jax.named_scope("vision_layer")
  def __call__(self, x, rng=None):
    dt = x.dtype
    branches = (lambda y: self.attn(self.norm1(y)) * self.ls1[...].astype(dt),
                lambda y: self.mlp(self.norm2(y)) * self.ls2[...].astype(dt))
    for i, branch in enumerate(branches):
      h = branch(x)
      if rng is not None and self.drop_rate > 0:
        h = drop_path(h, self.drop_rate, jax.random.fold_in(rng, i))
      x = x + h
    return x


class InternViT(nnx.Module):
  """pixel_values [tiles, H, W, 3] (NHWC, normalised) -> hidden states [tiles, 1 + H*W/p^2, D]."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: str = "none",
               kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.patch_embed = param(rngs, (p, p, 3, d), (None, None, None, "embed"), param_dtype)
    self.patch_bias = param(rngs, (d,), ("embed",), param_dtype, "zeros")
    self.class_embedding = param(rngs, (d,), ("embed",), param_dtype)
    self.position_embedding = param(rngs, (1 + cfg.grid ** 2, d), (None, "embed"), param_dtype)
    n_run = cfg.num_layers + 1 + cfg.select_layer  # layers after the selected one are never run
    if not 1 <= n_run <= cfg.num_layers:
      raise ValueError(f"vision select_layer={cfg.select_layer} is outside [-{cfg.num_layers}, -1]")
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.num_layers)
    self.layers = nnx.List([InternViTLayer(cfg, float(rates[i]), param_dtype=param_dtype,
                                           kernels_cfg=kernels_cfg, rngs=rngs) for i in range(n_run)])

  def embed(self, pixel_values):
    t, hgt, wid, c = pixel_values.shape
    p, dt = self.cfg.patch_size, self.dtype
    if c != 3 or hgt % p or wid % p:
      raise ValueError(f"pixel_values must be [tiles, H, W, 3] with H, W multiples of {p}; got {pixel_values.shape}")
    gh, gw = hgt // p, wid // p
    patches = pixel_values.astype(dt).reshape(t, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = dense("tijpqc,pqcd->tijd", patches, self.patch_embed[...]) + self.patch_bias[...].astype(dt)
    x = x.reshape(t, gh * gw, -1)
    pos = self.position_embedding[...]
    g = self.cfg.grid
    grid_pos = resize_pos_embed(pos[1:].reshape(g, g, -1), gh, gw).reshape(gh * gw, -1)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (t, 1, x.shape[-1]))
    x = jnp.concatenate([cls + pos[:1].astype(dt), x + grid_pos.astype(dt)], axis=1)
    return x

  def __call__(self, pixel_values, *, rngs: nnx.Rngs | None = None):
    """`rngs` (with a 'dropout' stream) turns on drop path, for training only."""
    x = constrain(self.embed(pixel_values), ("batch", "length", None))
    for layer in self.layers:
      rng = rngs.dropout() if rngs is not None else None
      x = call_layer(layer, self.remat, x, rng)
    return x

