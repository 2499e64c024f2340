"""ViR, the Visual Resolution Router of InternVL3.5-Flash (paper §3.3, Figure 2; REFERENCE.md §3).

Two paths leave InternViT: pixel shuffle 0.5 -> `mlp1` -> tokens_per_tile features (256 for 448 px tiles), and
pixel shuffle 0.25 -> `mlp2` -> a quarter of them (64). Per tile, a router reads the ViT tokens
(`CrossAttentionPooling`, then `Gating`) and gives p0 = P(compress); `route` decides from the p0 of one
request's tiles, and `compress_row` shortens that request's token ids: a compressed tile keeps the first 64
of its 256 <IMG_CONTEXT> slots.

The modules compute what the released remote code computes at inference (dropout off). The router runs in
float32 whatever the compute dtype: its output is compared against thresholds, and it costs about 1% of the
ViT. Attention with one query is computed with the query folded into the key weights (the key bias adds the
same score to every key, so softmax drops it; the value projection is applied after the weighted sum of the
tokens), which is torch's nn.MultiheadAttention up to rounding at a fraction of its cost.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import FlashConfig, InternVLConfig
from internvl_jax.model.layers import LayerNorm, dense, gelu, param

_F32 = jnp.float32
HEADS = 16  # CrossAttentionPooling(dim, num_heads=16) in the released code
EXPANSION = 4  # Gating(hidden_size, expansion_factor=4)


def _f32(p):
  return p[...].astype(_F32)


def _einsum(spec, *operands):
  # full float32 products: TPU (bf16 passes) and GPU (TF32) would otherwise round them by default
  return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST)


class MLP2(nnx.Module):
  """`mlp2`: LayerNorm(16 Dv) -> Linear(16 Dv, 2 Dl) -> GELU -> Linear(2 Dl, 2 Dl) -> GELU -> Linear(2 Dl, Dl), on the
  0.25 pixel shuffle of the ViT tokens (the released Sequential's Dropout(0.1) layers are off at inference)."""

  def __init__(self, in_dim: int, out_dim: int, *, param_dtype, rngs):
    mid = 2 * out_dim
    self.norm = LayerNorm(in_dim, 1e-5, axes=("mlp",), param_dtype=param_dtype, rngs=rngs)
    self.dense1 = param(rngs, (in_dim, mid), ("mlp", "embed"), param_dtype)
    self.bias1 = param(rngs, (mid,), ("embed",), param_dtype, "zeros")
    self.dense2 = param(rngs, (mid, mid), ("mlp", "embed"), param_dtype)
    self.bias2 = param(rngs, (mid,), ("embed",), param_dtype, "zeros")
    self.dense3 = param(rngs, (mid, out_dim), ("mlp", "embed"), param_dtype)
    self.bias3 = param(rngs, (out_dim,), ("embed",), param_dtype, "zeros")

  @jax.named_scope("mlp2")
  def __call__(self, x):
    dt = x.dtype
    h = gelu(dense("tnc,cd->tnd", self.norm(x), self.dense1[...]) + self.bias1[...].astype(dt))
    h = gelu(dense("tnc,cd->tnd", h, self.dense2[...]) + self.bias2[...].astype(dt))
    return dense("tnc,cd->tnd", h, self.dense3[...]) + self.bias3[...].astype(dt)


class PoolingAttention(nnx.Module):
  """torch nn.MultiheadAttention(Dv, heads, batch_first=True) with one query: packed in-projection (q, k, v
  rows of `in_proj_weight`), scale 1/sqrt(Dv/heads), softmax over the tile's tokens, out-projection."""

  def __init__(self, dim: int, heads: int, *, param_dtype, rngs):
    hd = dim // heads
    self.in_proj = param(rngs, (dim, 3, heads, hd), ("embed", None, "heads", "head_dim"), param_dtype)
    self.in_bias = param(rngs, (3, heads, hd), (None, "heads", "head_dim"), param_dtype, "zeros")
    self.out_proj = param(rngs, (heads, hd, dim), ("heads", "head_dim", "embed"), param_dtype)
    self.out_bias = param(rngs, (dim,), ("embed",), param_dtype, "zeros")

  def __call__(self, query, tokens):
    """query [n, Dv], tokens [n, L, Dv] (float32) -> [n, Dv]."""
    w, b = _f32(self.in_proj), _f32(self.in_bias)
    q = _einsum("nd,dhk->nhk", query, w[:, 0]) + b[0]
    folded = _einsum("nhk,dhk->nhd", q, w[:, 1]) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(_einsum("nld,nhd->nhl", tokens, folded), axis=-1)
    pooled = _einsum("nhl,nld->nhd", weights, tokens)
    v = _einsum("nhd,dhk->nhk", pooled, w[:, 2]) + b[2]
    return _einsum("nhk,hkd->nd", v, _f32(self.out_proj)) + _f32(self.out_bias)


class CrossAttentionPooling(nnx.Module):
  """A learned query token attends over a tile's ViT tokens four times, a LayerNorm after each step, no
  residuals (`FlashConfig.pooling` says which attention/norm modules the steps use)."""

  def __init__(self, dim: int, pooling: str, *, heads: int = HEADS, param_dtype, rngs):
    if pooling not in ("released", "four"):
      raise ValueError(f"FlashConfig.pooling must be 'released' or 'four', got {pooling!r}")
    self.steps = (1, 2, 2, 2) if pooling == "released" else (1, 2, 3, 4)
    self.query_token = param(rngs, (1, dim), (None, "embed"), param_dtype)
    for k in range(1, 5):
      setattr(self, f"attn{k}", PoolingAttention(dim, heads, param_dtype=param_dtype, rngs=rngs))
      setattr(self, f"norm{k}", LayerNorm(dim, 1e-5, param_dtype=param_dtype, rngs=rngs))

  @jax.named_scope("vir_pooling")
  def __call__(self, tokens):
    """tokens [tiles, L, Dv] (the class token dropped) -> [tiles, Dv] float32."""
    tokens = tokens.astype(_F32)
    x = jnp.broadcast_to(_f32(self.query_token), (tokens.shape[0], tokens.shape[-1]))
    for k in self.steps:
      x = getattr(self, f"norm{k}")(getattr(self, f"attn{k}")(x, tokens))
    return x


class GatingBlock(nnx.Module):
  """Linear(Dv, 4 Dv) -> GELU -> Linear(4 Dv, Dv) -> LayerNorm (dropouts off), used as x + block(x)."""

  def __init__(self, dim: int, expansion: int, *, param_dtype, rngs):
    self.fc1 = param(rngs, (dim, expansion * dim), ("embed", "mlp"), param_dtype)
    self.fc1_bias = param(rngs, (expansion * dim,), ("mlp",), param_dtype, "zeros")
    self.fc2 = param(rngs, (expansion * dim, dim), ("mlp", "embed"), param_dtype)
    self.fc2_bias = param(rngs, (dim,), ("embed",), param_dtype, "zeros")
    self.norm = LayerNorm(dim, 1e-5, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    h = gelu(_einsum("nd,de->ne", x, _f32(self.fc1)) + _f32(self.fc1_bias))
    return self.norm(_einsum("ne,ed->nd", h, _f32(self.fc2)) + _f32(self.fc2_bias))


class Gating(nnx.Module):
  """Four residual blocks, then LayerNorm -> Linear(Dv, 2) -> softmax: [tiles, 2]; class 0 = compress."""

  def __init__(self, dim: int, *, expansion: int = EXPANSION, param_dtype, rngs):
    for k in range(1, 5):
      setattr(self, f"block{k}", GatingBlock(dim, expansion, param_dtype=param_dtype, rngs=rngs))
    self.gate_norm = LayerNorm(dim, 1e-5, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = param(rngs, (dim, 2), ("embed", None), param_dtype)
    self.gate_bias = param(rngs, (2,), (None,), param_dtype, "zeros")

  @jax.named_scope("vir_gating")
  def __call__(self, x):
    for k in range(1, 5):
      x = x + getattr(self, f"block{k}")(x)
    return jax.nn.softmax(_einsum("nd,dk->nk", self.gate_norm(x), _f32(self.gate_proj)) + _f32(self.gate_bias), axis=-1)


# ------------------------------------------------------------------------------------ routing (host side)

def route(p0, flash: FlashConfig) -> np.ndarray:
  """Which of one request's tiles to compress: p0 [tiles] -> bool [tiles] (see `FlashConfig.rule`). The
  quantile interpolates linearly, as torch.quantile does."""
  p0 = np.asarray(p0, np.float32).reshape(-1)
  if not 0.0 <= flash.relative_threshold <= 1.0:
    raise ValueError(f"flash_relative_threshold must lie in [0, 1], got {flash.relative_threshold}")
  absolute = p0 >= np.float32(flash.absolute_threshold)
  if flash.rule == "absolute" or p0.size == 0:
    return absolute
  if flash.rule != "released":
    raise ValueError(f"FlashConfig.rule must be 'released' or 'absolute', got {flash.rule!r}")
  return (p0 > np.quantile(p0, flash.relative_threshold).astype(np.float32)) & absolute


def tile_tokens(cfg: InternVLConfig, pixel_shape) -> tuple[int, int]:
  """(tokens of a tile, tokens of a compressed tile) for tiles of shape [tiles, H, W, 3]: (256, 64) for 448 px
  tiles; other sizes count from their patch grid, as the plain path does (`internvl.feature_count`)."""
  h, w, p = pixel_shape[1], pixel_shape[2], cfg.vision.patch_size
  r = int(round(1 / cfg.downsample_ratio))
  if h % p or w % p or (h // p) % (r * r) or (w // p) % (r * r):
    raise ValueError(f"Flash routing needs tiles whose patch grid divides by {r * r} (the second pixel shuffle): "
                     f"got {h}x{w} px tiles of {p} px patches")
  return (h // p // r) * (w // p // r), (h // p // r // r) * (w // p // r // r)


def tiles_in_row(ids, cfg: InternVLConfig, row: int = 0, *, tokens: tuple[int, int] | None = None) -> int:
  """How many tiles a row's <IMG_CONTEXT> runs hold; each run must be a whole number of tiles (the released
  compression splits runs into blocks of tokens_per_tile), else an error naming the run. tokens: (T, C) of
  the request's tiles (`tile_tokens`; default the config's)."""
  ids = np.asarray(ids)
  t = (tokens or (cfg.tokens_per_tile, cfg.compressed_tokens_per_tile))[0]
  is_image = np.concatenate([[0], (ids == cfg.image_token_id).astype(np.int8), [0]])
  starts, ends = np.flatnonzero(np.diff(is_image) == 1), np.flatnonzero(np.diff(is_image) == -1)
  for s, e in zip(starts, ends):
    if (e - s) % t:
      raise ValueError(f"row {row}: the <IMG_CONTEXT> run at position {s} has {e - s} tokens, not a multiple of "
                       f"tokens_per_tile={t}; a Flash model routes whole tiles")
  return int(np.sum(ends - starts)) // t


def compress_row(ids, compress, cfg: InternVLConfig, *, first_tile: int, table_tiles: int,
                 tokens: tuple[int, int] | None = None):
  """One row's ids with the routed tiles shortened, and where each kept <IMG_CONTEXT> slot takes its feature.

  compress: bool [tiles of this row]; the row's tiles are rows first_tile.. of the feature tables. Features are
  looked up in the flat table concat(e256.reshape(table_tiles * T, d), e64.reshape(table_tiles * C, d)): a
  compressed tile keeps its first C slots and takes e64's features, the others keep all T and take e256's.
  tokens: (T, C) as in `tiles_in_row`. -> (new ids, index [kept image tokens] into that table)."""
  ids = np.asarray(ids)
  t, c = tokens or (cfg.tokens_per_tile, cfg.compressed_tokens_per_tile)
  positions = np.flatnonzero(ids == cfg.image_token_id)  # tile k owns positions[k*T:(k+1)*T]
  tile, slot = np.divmod(np.arange(positions.size), t)
  squeezed = np.asarray(compress, bool)[tile]
  dropped = squeezed & (slot >= c)
  keep = np.ones(ids.size, bool)
  keep[positions[dropped]] = False
  tile, slot, squeezed = tile[~dropped] + first_tile, slot[~dropped], squeezed[~dropped]
  index = np.where(squeezed, table_tiles * t + tile * c + slot, tile * t + slot)
  return ids[keep], index.astype(np.int32)
