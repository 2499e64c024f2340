"""InternVL: ViT -> pixel shuffle -> MLP -> merge into the <IMG_CONTEXT> slots -> LLM -> logits.

Call contract:
  logits = model(input_ids, pixel_values=None, attention_mask=None)
  input_ids [batch, seq] int; pixel_values float [tiles, H, W, 3] (NHWC, normalised), tiles in the
  order of their <IMG_CONTEXT> runs across the batch (row-major); attention_mask [batch, seq] (1 = token,
  0 = padding). Optional: position_ids [batch, seq] (default 0..seq-1; RoPE is relative, so a constant
  shift from left padding changes nothing), segment_ids [batch, seq] for packed rows (tokens attend only
  within their segment; 0 = padding; overrides attention_mask), return_aux=True to also get
  {'moe_aux_loss': ...} for training, return_hidden=True for the final normed hidden states [batch, seq, d]
  instead of logits (for a chunked loss), rngs (with a 'dropout' stream) to turn on drop path.
  Packed training rows pass pixel_values per row, [batch, R, H, W, 3]: row b's tiles in the order of its
  <IMG_CONTEXT> runs, then zero tiles up to the row's tile budget R (the data pipeline has checked each
  row's count, so rows shard over the batch axes with their own tiles).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import InternVLConfig
from internvl_jax.model.intern_vit import InternViT
from internvl_jax.model.layers import Keys
from internvl_jax.model.projector import MLPProjector, extract_feature
from internvl_jax.model.qwen3 import Qwen3Decoder


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


class InternVL(nnx.Module):

  def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    rngs = Keys(rngs)
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    v, t = cfg.vision, cfg.text
    self.vision_model = InternViT(v, dtype=dt, param_dtype=pdt, remat=cfg.remat, attention_impl=cfg.attention_impl,
                                  interpret=cfg.pallas_interpret, rngs=rngs)
    in_dim = v.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
    self.mlp1 = MLPProjector(in_dim, t.hidden_size, param_dtype=pdt, rngs=rngs)
    self.language_model = Qwen3Decoder(t, dtype=dt, param_dtype=pdt, remat=cfg.remat,
                                       attention_impl=cfg.attention_impl, moe_impl=cfg.moe_impl,
                                       interpret=cfg.pallas_interpret, rngs=rngs)

  def image_features(self, pixel_values, *, rngs: nnx.Rngs | None = None):
    """pixel_values [tiles, H, W, 3] -> [tiles, tokens_per_tile, llm hidden]."""
    return extract_feature(self.vision_model(pixel_values, rngs=rngs), self.mlp1, self.cfg.downsample_ratio)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, position_ids=None, segment_ids=None,
               return_aux: bool = False, return_hidden: bool = False, rngs: nnx.Rngs | None = None):
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
    if not isinstance(input_ids, jax.core.Tracer):
      check_vocab(input_ids, self.cfg.text.vocab_size)
    embeds = self.language_model.embed(input_ids)
    if pixel_values is not None and jnp.ndim(pixel_values) == 5:
      pv = jnp.asarray(pixel_values)
      feats = self.image_features(pv.reshape(-1, *pv.shape[2:]), rngs=rngs)
      embeds = merge_row_features(embeds, input_ids, feats.reshape(b, -1, feats.shape[-1]), self.cfg.image_token_id)
    elif pixel_values is not None:
      feats = self.image_features(jnp.asarray(pixel_values), rngs=rngs)
      embeds = merge_image_features(embeds, input_ids, feats.reshape(-1, feats.shape[-1]), self.cfg.image_token_id)
    else:
      check_image_tokens(input_ids, 0, self.cfg.image_token_id)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, aux = self.language_model(embeds, jnp.asarray(position_ids), jnp.asarray(segment_ids),
                                      return_hidden=return_hidden)
    if return_aux:
      return logits, {"moe_aux_loss": aux if aux is not None else jnp.zeros((), jnp.float32)}
    return logits


def init_model(cfg: InternVLConfig, *, seed: int = 0, mesh=None) -> InternVL:
  """A randomly initialised model, created by one jitted program (fast, unlike op-by-op init); with a
  Mesh every parameter is created directly in its shard."""
  from internvl_jax import sharding
  abstract = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(seed)))
  graphdef, abs_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abs_state, mesh) if mesh is not None else None
  state = jax.jit(lambda: nnx.state(InternVL(cfg, rngs=nnx.Rngs(seed))), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


@nnx.jit(static_argnames=("return_aux",))
def _forward(model: InternVL, input_ids, pixel_values, attention_mask, position_ids, segment_ids, return_aux):
  return model(input_ids, pixel_values, attention_mask, position_ids=position_ids, segment_ids=segment_ids,
               return_aux=return_aux)


def forward(model: InternVL, input_ids, pixel_values=None, attention_mask=None, *, position_ids=None,
            segment_ids=None, return_aux: bool = False):
  """Jitted `model(...)`; same arguments and results. Token ids and the <IMG_CONTEXT> count are checked here,
  on the host, before the program runs: a failed check raises from this call (a device callback's error can
  be reported by a later, unrelated dispatch)."""
  check_vocab(input_ids, model.cfg.text.vocab_size)
  if pixel_values is None or jnp.ndim(pixel_values) == 4:
    n_tiles = 0 if pixel_values is None else jnp.shape(pixel_values)[0]
    check_image_tokens(np.asarray(input_ids), n_tiles * model.cfg.tokens_per_tile, model.cfg.image_token_id)
  return _forward(model, input_ids, pixel_values, attention_mask, position_ids, segment_ids, return_aux)
