"""InternVL: ViT -> pixel shuffle -> MLP -> merge into the <IMG_CONTEXT> slots -> LLM -> logits.

Call contract:
  out = model(input_ids, pixel_values=None, attention_mask=None) -> Output(logits, hidden, moe_aux_loss)
  input_ids [batch, seq] int; pixel_values float [tiles, H, W, 3] (NHWC, normalised), tiles in the
  order of their <IMG_CONTEXT> runs across the batch (row-major); attention_mask [batch, seq] (1 = token,
  0 = padding). Optional: position_ids [batch, seq] (default 0..seq-1; RoPE is relative, so a constant
  shift from left padding changes nothing), segment_ids [batch, seq] for packed rows (tokens attend only
  within their segment; 0 = padding; overrides attention_mask), image_features [tiles, tokens per tile, d]
  in place of pixel_values (computed elsewhere: Flash routing, a separate vision server), rngs (with a
  'dropout' stream) to turn on drop path. Output.hidden are the final normed hidden states [batch, seq, d]
  (a chunked loss applies `language_model.head()` to them piece by piece; under jit the unused logits are
  never computed).
  Packed training rows pass pixel_values per row, [batch, R, H, W, 3]: row b's tiles in the order of its
  <IMG_CONTEXT> runs, then zero tiles up to the row's tile budget R (the data pipeline has checked each
  row's count, so rows shard over the batch axes with their own tiles).

`ij.forward` is the jitted call for users: logits, or (logits, {'moe_aux_loss'}) with return_aux=True.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import InternVLConfig
from internvl_jax import sharding
from internvl_jax.model.intern_vit import InternViT
from internvl_jax.model.gpt_oss import GptOssDecoder
from internvl_jax.model.layers import Keys
from internvl_jax.model.projector import MLPProjector, extract_feature
from internvl_jax.model.qwen3 import Qwen3Decoder
from internvl_jax.model.vir import MLP2, CrossAttentionPooling, Gating


def _raise_count_mismatch(n_tokens, n_features):
  if int(n_tokens) != int(n_features):
    raise ValueError(f"<IMG_CONTEXT> count mismatch: input_ids hold {int(n_tokens)} image tokens but "
                     f"pixel_values give {int(n_features)} features (tiles x tokens per tile)")


def check_image_tokens(input_ids, n_features: int, image_token_id: int):
  """Error unless input_ids hold exactly n_features <IMG_CONTEXT> tokens. Under a caller's own jit the check
  becomes a device callback, whose error the runtime may report on a later dispatch; our entry points
  (`forward`, the engine, the data pipeline) check on the host first."""
  count = jnp.sum(input_ids == image_token_id)
  if isinstance(count, jax.core.Tracer):
    jax.debug.callback(_raise_count_mismatch, count, n_features)
  else:
    _raise_count_mismatch(count, n_features)


def feature_count(cfg: InternVLConfig, pixel_shape) -> int | None:
  """How many image features tiles of shape [tiles, H, W, 3] give (H x W need not be `image_size`: the ViT
  interpolates its position embeddings), or None for a shape the ViT or pixel shuffle refuses (they raise)."""
  n, h, w = pixel_shape[:3]
  p, r = cfg.vision.patch_size, int(round(1 / cfg.downsample_ratio))
  if h % p or w % p or (h // p) % r or (w // p) % r:
    return None
  return n * (h // p // r) * (w // p // r)


def check_image_count(cfg: InternVLConfig, input_ids, pixel_values) -> None:
  """The <IMG_CONTEXT> count against tiles [tiles, H, W, 3] (or None), on the host: what `forward` and the
  engine's prefill check before their programs run. Shapes the ViT refuses are left to its own error."""
  n = 0 if pixel_values is None else feature_count(cfg, np.shape(pixel_values))
  if n is not None:
    check_image_tokens(np.asarray(input_ids), n, cfg.image_token_id)


def check_vocab(input_ids, vocab_size: int):
  """Ids outside [0, vocab) would be silently clamped by the embedding gather: refuse them."""
  lo, hi = int(np.min(input_ids)), int(np.max(input_ids))
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"input_ids hold ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")


def merge_row_features(embeds, input_ids, features, image_token_id: int):
  """Write features [b, n, d] into the <IMG_CONTEXT> positions of embeds [b, t, d], row by row: the k-th
  image token of row b takes features[b, k]. Features past a row's image tokens (padding tiles) are unused."""
  mask = input_ids == image_token_id
  index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features.astype(embeds.dtype), index[..., None], axis=1)
  return jnp.where(mask[..., None], gathered, embeds)


def merge_image_features(embeds, input_ids, features, image_token_id: int, *, check: bool = True):
  """Write features [n, d] into the <IMG_CONTEXT> positions of embeds [b, t, d], in row-major order.
  check=False is for callers that validated the count on the host and pad `features` to a bucket."""
  b, t, d = embeds.shape
  if check:
    check_image_tokens(input_ids, features.shape[0], image_token_id)
  mask = (input_ids == image_token_id).reshape(-1)
  index = jnp.clip(jnp.cumsum(mask) - 1, 0, features.shape[0] - 1)
  merged = jnp.where(mask[:, None], features.astype(embeds.dtype)[index], embeds.reshape(b * t, d))
  return merged.reshape(b, t, d)


class Output(NamedTuple):
  logits: jax.Array  # [batch, seq, vocab]
  hidden: jax.Array  # final normed hidden states [batch, seq, d]
  moe_aux_loss: jax.Array  # the load-balancing loss (scalar; 0 for a dense decoder)


PARTS = ("all", "vision", "language")


class InternVL(nnx.Module):
  """part: 'all', or one side of a DvD deployment (paper §2.5): 'vision' holds InternViT, the projector(s) and
  a Flash model's router; 'language' holds the LLM and takes `image_features=` computed elsewhere. Parameter
  paths are the same in every part, so a part loads its own tensors of a checkpoint and nothing else."""

  def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs, part: str = "all"):
    if part not in PARTS:
      raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    self.cfg, self.part = cfg, part
    rngs = Keys(rngs)
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    v, t = cfg.vision, cfg.text
    if part != "language":
      self.vision_model = InternViT(v, dtype=dt, param_dtype=pdt, remat=cfg.remat, kernels_cfg=cfg.kernels,
                                    rngs=rngs)
      in_dim = v.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
      self.mlp1 = MLPProjector(in_dim, t.hidden_size, param_dtype=pdt, rngs=rngs)
    if part != "vision":
      decoder = GptOssDecoder if t.arch == "gpt_oss" else Qwen3Decoder
      self.language_model = decoder(t, dtype=dt, param_dtype=pdt, remat=cfg.remat, kernels_cfg=cfg.kernels,
                                    rngs=rngs)
    if cfg.flash is not None and part != "language":  # Flash: the 64-token projector and the ViR router (vir.py)
      f = cfg.flash
      self.mlp2 = MLP2(v.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 4, t.hidden_size, param_dtype=pdt,
                       rngs=rngs)
      self.pooling_before_gating = CrossAttentionPooling(v.hidden_size, f.pooling, param_dtype=pdt, rngs=rngs)
      self.gating = Gating(v.hidden_size, param_dtype=pdt, rngs=rngs)

  def _needs(self, side: str):
    if self.part not in ("all", side):
      raise ValueError(f"this model holds only the {self.part} part (DvD); the {side} part runs elsewhere"
                       + (": pass image_features= from a vision server" if side == "vision" else ""))

  def image_features(self, pixel_values, *, rngs: nnx.Rngs | None = None):
    """pixel_values [tiles, H, W, 3] -> [tiles, tokens_per_tile, llm hidden]."""
    self._needs("vision")
    return extract_feature(self.vision_model(pixel_values, rngs=rngs), self.mlp1, self.cfg.downsample_ratio)

  def flash_features(self, pixel_values):
    """The Flash model's two projections and its router, from one ViT pass over tiles [tiles, H, W, 3]:
    (features [tiles, tokens_per_tile, d], compressed features [tiles, tokens_per_tile / 4, d],
    p0 [tiles] float32 = the router's probability of compressing each tile)."""
    if self.cfg.flash is None:
      raise ValueError("this model has no ViR router (InternVLConfig.flash is None): it is not a Flash model")
    self._needs("vision")
    hidden = self.vision_model(pixel_values)
    full = extract_feature(hidden, self.mlp1, self.cfg.downsample_ratio)
    compressed = extract_feature(hidden, self.mlp2, self.cfg.downsample_ratio ** 2)
    return full, compressed, self.gating(self.pooling_before_gating(hidden[:, 1:]))[:, 0]

  def embed_inputs(self, input_ids, pixel_values=None, *, image_features=None, checked: bool = False,
                   rngs: nnx.Rngs | None = None):
    """Token embeddings [b, t, d] with the projected image features written into the <IMG_CONTEXT> slots.

    pixel_values [tiles, H, W, 3] (tiles in row-major order of their runs) or [b, R, H, W, 3] (per row,
    zero tiles after the row's own); image_features [tiles, tokens per tile, d] instead of pixel_values.
    The count of image tokens must equal the features' (an error otherwise); checked=True is for a caller
    that validated it on the host and pads the tiles to a bucket (features past the last token are unused).
    """
    self._needs("language")
    embeds = self.language_model.embed(input_ids)
    if image_features is None and pixel_values is not None and jnp.ndim(pixel_values) == 5:
      b = input_ids.shape[0]
      pv = jnp.asarray(pixel_values)
      feats = self.image_features(pv.reshape(-1, *pv.shape[2:]), rngs=rngs)
      return merge_row_features(embeds, input_ids, feats.reshape(b, -1, feats.shape[-1]), self.cfg.image_token_id)
    if image_features is None and pixel_values is not None:
      image_features = self.image_features(jnp.asarray(pixel_values), rngs=rngs)
    if image_features is None:
      if not checked:
        check_image_tokens(input_ids, 0, self.cfg.image_token_id)
      return embeds
    feats = jnp.asarray(image_features)
    return merge_image_features(embeds, input_ids, feats.reshape(-1, feats.shape[-1]), self.cfg.image_token_id,
                                check=not checked)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, position_ids=None, segment_ids=None,
               image_features=None, rngs: nnx.Rngs | None = None) -> Output:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, t = input_ids.shape
    for name, x in (("attention_mask", attention_mask), ("position_ids", position_ids), ("segment_ids", segment_ids)):
      if x is not None and tuple(jnp.shape(x)) != (b, t):
        raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, input_ids {(b, t)}")
    if pixel_values is not None and not (jnp.ndim(pixel_values) == 4 or
                                         (jnp.ndim(pixel_values) == 5 and jnp.shape(pixel_values)[0] == b)):
      raise ValueError(f"pixel_values must be [tiles, H, W, 3] or [batch={b}, tiles per row, H, W, 3], got shape "
                       f"{tuple(jnp.shape(pixel_values))}")
    if pixel_values is not None and image_features is not None:
      raise ValueError("pass pixel_values or image_features, not both")
    if not isinstance(input_ids, jax.core.Tracer):
      check_vocab(input_ids, self.cfg.text.vocab_size)
    embeds = self.embed_inputs(input_ids, pixel_values, image_features=image_features, rngs=rngs)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = self.language_model(embeds, jnp.asarray(position_ids), jnp.asarray(segment_ids))
    return Output(out.logits, out.hidden, out.moe_aux_loss)


def init_model(cfg: InternVLConfig, *, seed: int = 0, mesh=None, part: str = "all") -> InternVL:
  """A randomly initialised model, created by one jitted program (fast, unlike op-by-op init); with a
  Mesh every parameter is created directly in its shard. part: see `InternVL` (a part's weights are those
  of the whole model of the same seed only for part='all'; load parts from a checkpoint)."""
  abstract = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(seed), part=part))
  graphdef, abs_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abs_state, mesh) if mesh is not None else None
  state = jax.jit(lambda: nnx.state(InternVL(cfg, rngs=nnx.Rngs(seed), part=part)), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


@nnx.jit(static_argnames=("return_aux",))
def _forward(model: InternVL, input_ids, pixel_values, attention_mask, position_ids, segment_ids, return_aux):
  out = model(input_ids, pixel_values, attention_mask, position_ids=position_ids, segment_ids=segment_ids)
  return (out.logits, {"moe_aux_loss": out.moe_aux_loss}) if return_aux else out.logits


def forward(model: InternVL, input_ids, pixel_values=None, attention_mask=None, *, position_ids=None,
            segment_ids=None, return_aux: bool = False):
  """Jitted `model(...)`: its arguments, and its logits (with `return_aux`, also {'moe_aux_loss'}). Token ids
  and the <IMG_CONTEXT> count are checked here, on the host, before the program runs: a failed check raises
  from this call (a device callback's error can be reported by a later, unrelated dispatch)."""
  check_vocab(input_ids, model.cfg.text.vocab_size)
  if pixel_values is None or jnp.ndim(pixel_values) == 4:  # packed rows [b, R, ...]: the pipeline checked them
    check_image_count(model.cfg, input_ids, pixel_values)
  return _forward(model, input_ids, pixel_values, attention_mask, position_ids, segment_ids, return_aux)
