"""ViCO, Visual Consistency Learning (paper §2.3, eq. 7-9; REFERENCE.md §3.3): the two training stages that
turn InternVL3.5 into InternVL3.5-Flash, as pure train steps. No public code implements ViCO; where the paper
is silent the choice is ours and WORKSPACE.md ("Flash and ViCO") lists it.

Stage 1, consistency training (`consistency_step`, eq. 7). The reference π_ref is a frozen copy of the
starting model and always sees 256 tokens per tile (`mlp1`). The policy sees each image at a compression ξ
drawn per image (every tile of an image shares it) uniformly from {1/4: 256 tokens, `mlp1`; 1/16: 64 tokens,
`mlp2`}. The loss is, per sample, the mean over its response tokens of

    KL(π_ref(· | y_<i, I) ‖ π_policy(· | y_<i, I_ξ)) = Σ_v p_ref(v) (log p_ref(v) - log p_policy(v)),

averaged over the samples of the global batch. The direction is the paper's: the reference's distribution
is the target and the policy is fitted to it (the forward, mass-covering KL), so the policy must keep every
answer the uncompressed model would give; its gradient is the cross-entropy against p_ref's soft labels, and
it needs no sampling from the policy. The paper adds no next-token loss; `ntp_weight` > 0 adds SFT's
square-averaged cross-entropy of the policy on the labels.

Stage 2, router training (`router_step`, eq. 8-9). Everything but the router (pooling + gating) is frozen.
For tile i, r_i = L(y | tile i at 64, the rest at 256) / L(y | every tile at 256), L the eq. 7 divergence of
the tile's sample against π_ref; the label is 0 ("compress") when r_i < τ, else 1, with τ the k-th percentile
of a sliding window of recent r values (`RouterWindow`, carried in the train state and checkpointed); the
loss is the cross-entropy of the gate's two-way softmax against the labels.

How a compressed tile enters the LLM: rows keep their length. A compressed tile's first C = T/4
<IMG_CONTEXT> slots take its `mlp2` features and its other T - C slots are dropped from attention (segment id
0, which no token attends to) while the positions of the tokens after them close the gap, so every token sees
exactly the sequence `vir.compress_row` would build (tested against that shortened sequence). Same shapes for
the reference, the policy and every router variant: one program each, and the response tokens of all of
them sit at the same positions.

Batch contract: `sft.BATCH_KEYS` (packed rows, pixel_values [B, R, H, W, 3]) plus, from `tile_layout` on the
host, tile_image [B, R] (which image of its row each tile belongs to, -1 for a padding tile) and
tile_segment [B, R] (the packed sample it belongs to, 0 for padding).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from internvl_jax.inputs.labels import IGNORE
from internvl_jax.model.internvl import merge_row_features
from internvl_jax.model.layers import dense
from internvl_jax.model.projector import extract_feature
from internvl_jax.training import sft

BATCH_KEYS = sft.BATCH_KEYS + ("tile_image", "tile_segment")
ROUTER_PARTS = ("pooling_before_gating", "gating")  # ViR's patch router: the only part stage 2 trains
_F32 = jnp.float32


# ------------------------------------------------------------------------------------------ host side

def tile_layout(input_ids, segment_ids, image_token_id: int, tokens_per_tile: int, tiles_per_row: int) -> dict:
  """Which image and which packed sample each tile slot of a batch belongs to: {'tile_image', 'tile_segment'}
  [B, R] int32. Row b's tiles are its <IMG_CONTEXT> slots in blocks of tokens_per_tile, in order; an image is
  one run of consecutive <IMG_CONTEXT> tokens; tile slots past the row's tiles get -1 and 0."""
  ids, seg = np.asarray(input_ids), np.asarray(segment_ids)
  b = ids.shape[0]
  image = np.full((b, tiles_per_row), -1, np.int32)
  sample = np.zeros((b, tiles_per_row), np.int32)
  for row in range(b):
    is_img = ids[row] == image_token_id
    positions = np.flatnonzero(is_img)
    if positions.size % tokens_per_tile:
      raise ValueError(f"row {row}: {positions.size} <IMG_CONTEXT> tokens, not a whole number of "
                       f"{tokens_per_tile}-token tiles")
    n = positions.size // tokens_per_tile
    if n > tiles_per_row:
      raise ValueError(f"row {row}: {n} tiles, more than the batch's {tiles_per_row} tile slots")
    run_start = is_img & ~np.concatenate([[False], is_img[:-1]])
    run_of_token = np.cumsum(run_start) - 1
    first = positions[::tokens_per_tile]
    image[row, :n], sample[row, :n] = run_of_token[first], seg[row, first]
  return {"tile_image": image, "tile_segment": sample}


# ------------------------------------------------------------------------------------------ inputs

def tile_features(model, pixel_values, *, hidden=None, rngs=None):
  """The policy's two projections of every tile slot: pixel_values [B, R, H, W, 3] -> (ViT hidden [B*R, 1+N,
  Dv], full [B, R, T, d] from `mlp1`, compressed [B, R, C, d] from `mlp2`), from one ViT pass."""
  b, r = pixel_values.shape[:2]
  if hidden is None:
    hidden = model.vision_model(pixel_values.reshape(b * r, *pixel_values.shape[2:]), rngs=rngs)
  ratio = model.cfg.downsample_ratio
  full = extract_feature(hidden, model.mlp1, ratio)
  small = extract_feature(hidden, model.mlp2, ratio * ratio)
  return hidden, full.reshape(b, r, *full.shape[1:]), small.reshape(b, r, *small.shape[1:])


def routed_inputs(model, input_ids, segment_ids, position_ids, full, small, compress):
  """Embeddings, segment ids and positions of rows whose tiles with compress [B, R] true take the 64-token
  path (see the module docstring): full [B, R, T, d], small [B, R, C, d] -> ([B, L, d], [B, L], [B, L])."""
  b, r, t, d = full.shape
  c = small.shape[2]
  small = jnp.pad(small, ((0, 0), (0, 0), (0, t - c), (0, 0)))
  feats = jnp.where(compress[:, :, None, None], small.astype(full.dtype), full).reshape(b, r * t, d)
  image_token = model.cfg.image_token_id
  embeds = merge_row_features(model.language_model.embed(input_ids), input_ids, feats, image_token)
  is_img = input_ids == image_token
  k = jnp.cumsum(is_img, axis=1) - 1  # the image token's index in its row
  tile = jnp.clip(k // t, 0, r - 1)
  dropped = is_img & jnp.take_along_axis(compress, tile, axis=1) & (k % t >= c)
  before = jnp.cumsum(dropped, axis=1) - dropped  # dropped slots before each position in the row
  # ... of which those before the token's own sample (positions restart at 0 per packed sample) do not count
  at_start = jax.lax.cummax(jnp.where(position_ids == 0, before, 0), axis=1)
  return embeds, jnp.where(dropped, 0, segment_ids), position_ids - (before - at_start)


def draw_compression(key, tile_image, p: float = 0.5, tile_mix: float = 0.0):
  """ξ per image: image j of row b takes the 64-token path with probability p, and all its tiles with it.
  tile_mix > 0: that fraction of the images draws ξ per tile instead, so the policy also sees the mixed
  images routing makes at inference (not in the paper; see WORKSPACE.md, "Flash and ViCO").
  tile_image [B, R] -> compress [B, R] bool (False for padding tiles)."""
  image = jnp.maximum(tile_image, 0)
  per_image = jax.random.bernoulli(key, p, tile_image.shape)  # a row holds at most R images
  compress = jnp.take_along_axis(per_image, image, axis=1)
  if tile_mix:
    mixed = jnp.take_along_axis(jax.random.bernoulli(jax.random.fold_in(key, 1), tile_mix, tile_image.shape), image,
                                axis=1)
    compress = jnp.where(mixed, jax.random.bernoulli(jax.random.fold_in(key, 2), p, tile_image.shape), compress)
  return compress & (tile_image >= 0)


# ------------------------------------------------------------------------------------------ eq. 7

def token_kl(ref_logits, policy_logits):
  """KL(p_ref ‖ p_policy) over the vocabulary, float32: [..., V], [..., V] -> [...]."""
  ref = jax.nn.log_softmax(ref_logits.astype(_F32), axis=-1)
  pol = jax.nn.log_softmax(policy_logits.astype(_F32), axis=-1)
  return jnp.sum(jnp.exp(ref) * (ref - pol), axis=-1)


def next_token_kl(ref_hidden, ref_head, hidden, head, chunk: int = 0):
  """`token_kl` of the next-token distributions at positions 0..L-2 from the final hidden states [B, L, D]
  and the heads [D, V] -> [B, L-1]. chunk > 0: that many positions at a time under remat, so that the two
  [B, L, V] logits never exist at once (as `sft.chunked_next_token_ce`)."""
  b, length, _ = hidden.shape

  def piece(rh, h):
    return token_kl(dense("bcd,dv->bcv", rh, ref_head), dense("bcd,dv->bcv", h, head))

  if not chunk:
    return piece(ref_hidden[:, :-1], hidden[:, :-1])
  n = -(-(length - 1) // chunk)
  pad = lambda x: jnp.pad(x[:, :-1], ((0, 0), (0, n * chunk - (length - 1)), (0, 0))).reshape(
      b, n, chunk, x.shape[-1]).swapaxes(0, 1)
  kl = jax.lax.map(lambda xs: jax.checkpoint(piece)(*xs), (pad(ref_hidden), pad(hidden)))
  return kl.swapaxes(0, 1).reshape(b, n * chunk)[:, :length - 1]


def sample_means(values, labels, segment_ids):
  """Per packed sample, the mean of values [B, L-1] over its response positions (labels[:, 1:] supervised):
  -> (means [B, L], response tokens [B, L]), indexed [row, segment id] (0 where a segment has none)."""
  b, length = segment_ids.shape
  valid = labels[:, 1:] != IGNORE
  index = (jnp.arange(b)[:, None] * length + segment_ids[:, 1:]).reshape(-1)
  sums = jax.ops.segment_sum(jnp.where(valid, values, 0.0).reshape(-1), index, num_segments=b * length)
  counts = jax.ops.segment_sum(valid.astype(_F32).reshape(-1), index, num_segments=b * length)
  return (sums / jnp.maximum(counts, 1.0)).reshape(b, length), counts.reshape(b, length)


def consistency_loss(kl, labels, segment_ids):
  """Eq. 7 over a batch: the mean over samples (each with ≥ 1 response token) of their mean token KL.
  -> (loss, per-sample means [B, L], sample mask [B, L])."""
  means, counts = sample_means(kl, labels, segment_ids)
  has = counts > 0
  return jnp.sum(jnp.where(has, means, 0.0)) / jnp.maximum(jnp.sum(has), 1), means, has


# ------------------------------------------------------------------------------------------ stage 1

@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
  compress_prob: float = 0.5  # P(ξ = 1/16) per image: the paper's uniform draw
  tile_mix: float = 0.0  # the fraction of images whose tiles draw ξ one by one (the paper: 0)
  ntp_weight: float = 0.0  # weight of the policy's square-averaged next-token loss (the paper: none)
  loss_chunk: int = 0  # > 0: the KL this many positions at a time
  aux_loss_coef: float = 0.0  # MoE load balancing of the policy
  drop_path: bool = False  # the ViT's drop path


def _reference_out(ref_graphdef, ref_params, ref_rest, batch):
  ref = nnx.merge(ref_graphdef, ref_params, ref_rest)
  out = ref(batch["input_ids"], batch["pixel_values"], position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"])
  return jax.lax.stop_gradient(out.hidden), jax.lax.stop_gradient(ref.language_model.head())


def consistency_step(state: sft.TrainState, ref_params, batch: dict, *, graphdef, rest, ref_graphdef, ref_rest,
                     tx: optax.GradientTransformation, cfg: ConsistencyConfig):
  """One optimiser step of eq. 7. Pure: (state, reference parameters, batch) -> (state, metrics). The
  reference's log-probs are computed here, once per batch, and nothing flows back to it."""
  batch = {k: batch[k] for k in BATCH_KEYS}
  key = jax.random.fold_in(state.key, state.step)
  compress = draw_compression(jax.random.fold_in(key, 0), batch["tile_image"], cfg.compress_prob, cfg.tile_mix)
  ref_hidden, ref_head = _reference_out(ref_graphdef, ref_params, ref_rest, batch)
  labels, seg = batch["labels"], batch["segment_ids"]
  weight_sum = jnp.maximum(jnp.sum(jnp.where(labels[:, 1:] != IGNORE, batch["loss_weights"][:, 1:], 0.0)), 1e-6)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen, rest)
    rngs = nnx.Rngs(dropout=jax.random.fold_in(key, 1)) if cfg.drop_path else None
    _, full, small = tile_features(model, batch["pixel_values"], rngs=rngs)
    embeds, seg_p, pos_p = routed_inputs(model, batch["input_ids"], seg, batch["position_ids"], full, small, compress)
    out = model.language_model(embeds, pos_p, seg_p)
    kl = next_token_kl(ref_hidden, ref_head, out.hidden, model.language_model.head(), cfg.loss_chunk)
    loss, means, has = consistency_loss(kl, labels, seg)
    ce = jnp.zeros((), _F32)
    if cfg.ntp_weight:
      logits = dense("btd,dv->btv", out.hidden, model.language_model.head())
      ce = sft.weighted_next_token_ce(logits, labels, batch["loss_weights"])[0] / weight_sum
    return loss + cfg.ntp_weight * ce + cfg.aux_loss_coef * out.moe_aux_loss, (loss, ce, means, has)

  (total, (kl, ce, means, has)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  squeezed = _samples_with(compress, batch["tile_segment"], seg.shape[1])
  mean_over = lambda m: jnp.sum(jnp.where(m, means, 0.0)) / jnp.maximum(jnp.sum(m), 1)
  tiles = jnp.maximum(jnp.sum(batch["tile_image"] >= 0), 1)
  metrics = {"loss": total, "kl": kl, "kl/compressed": mean_over(has & squeezed), "kl/full": mean_over(has & ~squeezed),
             "ce": ce, "compressed_fraction": jnp.sum(compress) / tiles, "grad_norm": optax.tree.norm(grads)}
  return sft.apply_gradients(state, grads, tx), metrics


def _samples_with(compress, tile_segment, length):
  """[B, L] indexed [row, segment id]: whether the sample holds a compressed tile."""
  b = compress.shape[0]
  index = (jnp.arange(b)[:, None] * length + tile_segment).reshape(-1)
  return jax.ops.segment_max(compress.reshape(-1).astype(jnp.int32), index, num_segments=b * length).reshape(
      b, length) > 0


# ------------------------------------------------------------------------------------------ eq. 8-9

@struct.dataclass
class RouterWindow:
  """The sliding window of recent r_i values τ is read from (eq. 9): a ring of `size` slots (NaN = empty)
  and the count of values pushed so far (the next write slot is count mod size)."""
  values: jax.Array
  count: jax.Array


def window_init(size: int) -> RouterWindow:
  return RouterWindow(values=jnp.full((size,), jnp.nan, _F32), count=jnp.zeros((), jnp.int32))


def window_push(window: RouterWindow, r, valid) -> RouterWindow:
  """The valid entries of r (row-major) appended to the ring. A batch must not hold more valid values than
  the window has slots (`check_window`)."""
  r, valid = r.reshape(-1), valid.reshape(-1)
  size = window.values.shape[0]
  slot = jnp.where(valid, (window.count + jnp.cumsum(valid) - 1) % size, size)  # size = out of range: dropped
  values = window.values.at[slot].set(r.astype(_F32), mode="drop")
  return RouterWindow(values=values, count=window.count + jnp.sum(valid).astype(jnp.int32))


def check_window(size: int, tiles_per_step: int) -> None:
  if size < tiles_per_step:
    raise ValueError(f"vico.window={size} is smaller than the {tiles_per_step} tile slots of a step: one step's "
                     "ratios would overwrite each other")


def threshold(window: RouterWindow, percentile: float):
  """τ: the `percentile`-th percentile (linear interpolation, as numpy) of the values in the window."""
  return jnp.nanpercentile(window.values, percentile)


def loss_ratios(kl, tile_segment, eps: float):
  """Eq. 8. kl [B, 1 + R, L]: per row, variant v (0 = every tile at 256, 1 + i = tile i at 64) and segment
  id, the sample's mean token KL against π_ref -> r [B, R] = (KL with tile i at 64 + eps) / (KL at 256 + eps)
  of the sample that holds tile i. eps keeps a sample the policy matches exactly (KL 0) finite."""
  full = jnp.take_along_axis(kl[:, 0], tile_segment, axis=1)
  squeezed = jnp.take_along_axis(kl[:, 1:], tile_segment[:, :, None], axis=2)[..., 0]
  return (squeezed + eps) / (full + eps)


def router_labels(r, tau):
  """Eq. 9: 0 (compress to 64 tokens) where r < τ, 1 (keep 256) where r ≥ τ."""
  return (r >= tau).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  percentile: float = 50.0  # k: τ's percentile of the window (50: balanced targets, as the paper reports)
  eps: float = 1e-6  # added to both KLs of eq. 8
  loss_chunk: int = 0  # > 0: the KL this many positions at a time


def router_targets(model, ref_hidden, ref_head, batch, hidden, *, loss_chunk: int = 0, eps: float = 1e-6):
  """Eq. 8 for every tile of a batch, in one program: each row runs 1 + R times through the frozen LLM on a
  batch axis (variant 0 with every tile at 256 tokens, variant 1 + i with tile i at 64) from one ViT pass.
  -> (r [B, R], per-sample KL at 256 [B, L], samples with response tokens [B, L])."""
  b, r = batch["tile_image"].shape
  v = 1 + r
  _, full, small = tile_features(model, batch["pixel_values"], hidden=hidden)
  compress = jnp.concatenate([jnp.zeros((1, r), bool), jnp.eye(r, dtype=bool)])  # [V, R]
  compress = jnp.broadcast_to(compress, (b, v, r)) & (batch["tile_image"] >= 0)[:, None, :]
  rep = lambda x: jnp.repeat(x, v, axis=0)  # row b's variants stay next to each other (and on b's device)
  embeds, seg, pos = routed_inputs(model, rep(batch["input_ids"]), rep(batch["segment_ids"]),
                                   rep(batch["position_ids"]), rep(full), rep(small), compress.reshape(b * v, r))
  out = model.language_model(embeds, pos, seg)
  kl = next_token_kl(rep(ref_hidden), ref_head, out.hidden, model.language_model.head(), loss_chunk)
  means, counts = sample_means(kl, rep(batch["labels"]), rep(batch["segment_ids"]))
  means, counts = means.reshape(b, v, -1), counts.reshape(b, v, -1)
  return loss_ratios(means, batch["tile_segment"], eps), means[:, 0], counts[:, 0] > 0


def router_step(state: sft.TrainState, window: RouterWindow, ref_params, batch: dict, *, graphdef, rest, ref_graphdef,
                ref_rest, tx: optax.GradientTransformation, cfg: RouterConfig):
  """One optimiser step of the router (eq. 8-9). Pure: (state, window, reference parameters, batch) ->
  (state, window, metrics). `state.params` holds only the router; every other part is in `state.frozen`.
  Forwards per step: the reference once (ViT + LLM, B rows), the policy's ViT once (B x R tiles), its LLM
  on B x (1 + R) rows, the router on B x R tiles; only the router is differentiated."""
  batch = {k: batch[k] for k in BATCH_KEYS}
  model = nnx.merge(graphdef, state.params, state.frozen, rest)
  b, r = batch["tile_image"].shape
  pv = batch["pixel_values"]
  hidden = jax.lax.stop_gradient(model.vision_model(pv.reshape(b * r, *pv.shape[2:])))
  ref_hidden, ref_head = _reference_out(ref_graphdef, ref_params, ref_rest, batch)
  ratios, kl_full, has = jax.lax.stop_gradient(router_targets(model, ref_hidden, ref_head, batch, hidden,
                                                              loss_chunk=cfg.loss_chunk, eps=cfg.eps))
  valid = batch["tile_image"] >= 0
  window = window_push(window, ratios, valid)
  tau = threshold(window, cfg.percentile)
  target = router_labels(ratios, tau).reshape(-1)
  weight = valid.reshape(-1).astype(_F32)
  n = jnp.maximum(jnp.sum(weight), 1.0)

  def loss_fn(params):
    router = nnx.merge(graphdef, params, state.frozen, rest)
    probs = router.gating(router.pooling_before_gating(hidden[:, 1:]))  # [B*R, 2]; class 0 = compress
    nll = -jnp.log(jnp.maximum(jnp.take_along_axis(probs, target[:, None], axis=1)[:, 0], 1e-12))
    return jnp.sum(nll * weight) / n, probs

  (loss, probs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  predicted = jnp.argmax(probs, axis=-1)
  metrics = {"loss": loss, "tau": tau, "kl": jnp.sum(jnp.where(has, kl_full, 0.0)) / jnp.maximum(jnp.sum(has), 1),
             "router_accuracy": jnp.sum((predicted == target) * weight) / n,
             "compressed_fraction": jnp.sum((target == 0) * weight) / n,
             "predicted_compressed_fraction": jnp.sum((predicted == 0) * weight) / n,
             "ratio_median": jnp.nanmedian(jnp.where(valid, ratios, jnp.nan)), "grad_norm": optax.tree.norm(grads)}
  return sft.apply_gradients(state, grads, tx), window, metrics


# ------------------------------------------------------------------------------------------ jit

def make_step(stage: str, graphdef, rest, ref_graphdef, ref_rest, tx, mesh, state_sh, ref_sh, batch_sh, cfg: Any):
  """The jitted step of 'vico_consistency' (state, ref, batch) or 'vico_router' (state, window, ref, batch),
  old state donated, traced under `mesh` with explicit shardings (the window replicated)."""
  replicated = jax.NamedSharding(mesh, jax.P())
  kw = dict(graphdef=graphdef, rest=rest, ref_graphdef=ref_graphdef, ref_rest=ref_rest, tx=tx, cfg=cfg)
  if stage == "vico_consistency":
    step = jax.jit(functools.partial(consistency_step, **kw), in_shardings=(state_sh, ref_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=0)
  else:
    step = jax.jit(functools.partial(router_step, **kw), in_shardings=(state_sh, replicated, ref_sh, batch_sh),
                   out_shardings=(state_sh, replicated, None), donate_argnums=(0, 1))
  return sft.under_mesh(step, mesh)
