"""ViCO's steps (training/vico.py) against hand computations: eq. 7's KL against float64 torch on sequences
shortened by hand, ξ drawn per image, eq. 8's ratios, τ and the labels, frozen parts bitwise unchanged, and 8
simulated devices equal 1. The train.py stages end to end (a resumed router run repeats the uninterrupted
one, τ window included) are in test_vico_stages."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from internvl_jax import sharding, zoo
from internvl_jax.model.internvl import init_model
from internvl_jax.training import optim, sft, vico

CFG = zoo.get("tiny-flash")
T, C = CFG.tokens_per_tile, CFG.compressed_tokens_per_tile
SIZE = CFG.vision.image_size
FULL = ("vision_model", "mlp1", "mlp2", "language_model")


def make_batch(rows=(((2, 1), (1,)), ((3,),)), length=48, tiles=4, seed=0):
  """Packed rows: rows[b] lists row b's samples, each a tuple of its images' tile counts; every sample is
  prompt text, its images, text, then a 4-token reply (the labels)."""
  rng = np.random.default_rng(seed)
  b = {k: np.zeros((len(rows), length), np.int32) for k in ("input_ids", "segment_ids", "position_ids")}
  b["labels"] = np.full((len(rows), length), -100, np.int32)
  b["loss_weights"] = np.zeros((len(rows), length), np.float32)
  b["pixel_values"] = np.zeros((len(rows), tiles, SIZE, SIZE, 3), np.float32)
  for r, samples in enumerate(rows):
    pos = tile = 0
    for s, images in enumerate(samples):
      prompt = list(rng.integers(1, 400, 2))
      for n in images:
        prompt += [CFG.image_token_id] * (T * n) + list(rng.integers(1, 400, 1))
        b["pixel_values"][r, tile:tile + n] = rng.standard_normal((n, SIZE, SIZE, 3))
        tile += n
      reply = list(rng.integers(1, 400, 4))
      ids, n_tok = prompt + reply, len(prompt) + 4
      sl = slice(pos, pos + n_tok)
      b["input_ids"][r, sl], b["segment_ids"][r, sl], b["position_ids"][r, sl] = ids, s + 1, np.arange(n_tok)
      b["labels"][r, pos + len(prompt):pos + n_tok] = reply
      b["loss_weights"][r, pos + len(prompt):pos + n_tok] = 0.5
      pos += n_tok
  b.update(vico.tile_layout(b["input_ids"], b["segment_ids"], CFG.image_token_id, T, tiles))
  return b


@pytest.fixture(scope="module")
def models():
  """(reference: a plain model, policy: a Flash model with other weights)."""
  return init_model(CFG.replace(flash=None), seed=1), init_model(CFG, seed=2)


def _optimizer(lr):  # eps 1e-4: an Adam step of a near-zero gradient would otherwise be ±lr on rounding noise
  ocfg = ml_collections.ConfigDict(dict(lr=lr, warmup=0, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-4, clip_norm=1.0))
  return optim.make_optimizer(ocfg, 100)[0]


def _setup(stage, models, batch, mesh_shape=None, window=64, lr=1e-2):
  """(step, state, window, ref params, batch) placed on a mesh of `mesh_shape` (default one device)."""
  mesh_shape = mesh_shape or {"fsdp": 1}
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  ref, policy = models
  rg, rp, rr = nnx.split(ref, nnx.Param, ...)
  g, p, rest = nnx.split(policy, nnx.Param, ...)
  train, frozen = optim.split_trainable(jax.tree.map(jnp.copy, p), FULL if stage == "vico_consistency"
                                        else vico.ROUTER_PARTS, flash=True)
  tx = _optimizer(lr)
  state = sft.TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen, opt_state=tx.init(train),
                         key=jax.random.key_data(jax.random.key(0)))
  state_sh = sft.state_shardings(jax.eval_shape(lambda s: s, state), mesh, tx)
  ref_sh = sharding.state_shardings(rp, mesh)
  batch_sh = sft.batch_sharding(mesh, batch)
  cfg = vico.ConsistencyConfig() if stage == "vico_consistency" else vico.RouterConfig()
  step = vico.make_step(stage, g, rest, rg, rr, tx, mesh, state_sh, ref_sh, batch_sh, cfg)
  win = jax.device_put(vico.window_init(window), jax.NamedSharding(mesh, jax.P()))
  return (step, jax.device_put(state, state_sh), win, jax.device_put(jax.tree.map(jnp.copy, rp), ref_sh),
          jax.device_put(batch, batch_sh))


# ------------------------------------------------------------------------------------------ by hand

def shortened(policy, batch, compress):
  """The policy on sequences shortened by hand: a compressed tile keeps its first C slots (its mlp2
  features), the rest of its slots are deleted, positions restart per sample. -> per row, per sample, the
  logits [n, V] at the positions that predict the reply tokens (float64)."""
  b, r = batch["tile_image"].shape
  full, small, _ = policy.flash_features(jnp.asarray(batch["pixel_values"]).reshape(b * r, SIZE, SIZE, 3))
  full, small = np.asarray(full).reshape(b, r, T, -1), np.asarray(small).reshape(b, r, C, -1)
  out = []
  for row in range(b):
    ids, seg, labels = (batch[k][row] for k in ("input_ids", "segment_ids", "labels"))
    keep, feats, k = np.ones(len(ids), bool), [], 0
    for pos in np.flatnonzero(ids == CFG.image_token_id):
      tile, slot = divmod(k, T)
      k += 1
      if compress[row, tile]:
        keep[pos] = slot < C
        if slot < C:
          feats.append(small[row, tile, slot])
      else:
        feats.append(full[row, tile, slot])
    ids, seg, labels = ids[keep], seg[keep], labels[keep]
    pos = np.concatenate([np.arange(np.sum(seg == s)) for s in np.unique(seg) if s] + [np.zeros(np.sum(seg == 0))])
    logits = np.asarray(policy(ids[None], position_ids=pos[None].astype(np.int32), segment_ids=seg[None],
                               image_features=np.stack(feats)).logits[0], np.float64)
    out.append({s: logits[:-1][(labels[1:] != -100) & (seg[1:] == s)] for s in np.unique(seg) if s})
  return out


def reference_logits(ref, batch):
  logits = np.asarray(ref(batch["input_ids"], batch["pixel_values"], position_ids=batch["position_ids"],
                          segment_ids=batch["segment_ids"]).logits, np.float64)
  out = []
  for row in range(logits.shape[0]):
    seg, labels = batch["segment_ids"][row], batch["labels"][row]
    out.append({s: logits[row, :-1][(labels[1:] != -100) & (seg[1:] == s)] for s in np.unique(seg) if s})
  return out


def torch_kl(ref, pol):
  """Eq. 7's token KL(π_ref ‖ π_policy), averaged over a sample's reply tokens, in float64 torch."""
  lr, lp = torch.log_softmax(torch.tensor(ref), -1), torch.log_softmax(torch.tensor(pol), -1)
  return float((lr.exp() * (lr - lp)).sum(-1).mean())


def _compress_of_first_step(batch):
  key = jax.random.fold_in(jax.random.key_data(jax.random.key(0)), 0)
  return np.asarray(vico.draw_compression(jax.random.fold_in(key, 0), jnp.asarray(batch["tile_image"])))


# ------------------------------------------------------------------------------------------ tests

def test_tile_layout_names_each_tiles_image_and_sample():
  b = make_batch()
  np.testing.assert_array_equal(b["tile_image"], [[0, 0, 1, 2], [0, 0, 0, -1]])
  np.testing.assert_array_equal(b["tile_segment"], [[1, 1, 1, 2], [1, 1, 1, 0]])
  with pytest.raises(ValueError, match="row 0: .* not a whole number"):
    vico.tile_layout(b["input_ids"][:, 1:], b["segment_ids"][:, 1:], CFG.image_token_id, T + 1, 4)


def test_xi_is_drawn_per_image_and_each_tile_takes_its_images_path(models):
  _, policy = models
  batch = make_batch()
  image = batch["tile_image"]
  seen = set()
  for seed in range(16):
    compress = np.asarray(vico.draw_compression(jax.random.key(seed), jnp.asarray(image)))
    assert not compress[image < 0].any()
    for row in range(2):
      for j in set(image[row][image[row] >= 0]):
        assert len(set(compress[row][image[row] == j])) == 1  # all tiles of an image share ξ
    seen.add(tuple(compress[0, [0, 2, 3]]))
  assert len(seen) > 3  # the three images of row 0 are drawn independently
  mixed = [np.asarray(vico.draw_compression(jax.random.key(seed), jnp.asarray(image), 0.5, tile_mix=1.0))
           for seed in range(8)]
  assert any(len(set(m[1, :3])) == 2 for m in mixed)  # tile_mix: the 3-tile image's tiles drawn one by one
  assert not any(m[image < 0].any() for m in mixed)

  compress = np.array([[True, True, False, True], [False, False, False, False]])
  _, full, small = vico.tile_features(policy, jnp.asarray(batch["pixel_values"]))
  embeds, seg, pos = vico.routed_inputs(policy, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"]),
                                        jnp.asarray(batch["position_ids"]), full, small, jnp.asarray(compress))
  embeds, seg, pos = np.asarray(embeds), np.asarray(seg), np.asarray(pos)
  for row in range(2):
    slots = np.flatnonzero(batch["input_ids"][row] == CFG.image_token_id)
    for k, p in enumerate(slots):
      tile, slot = divmod(k, T)
      if compress[row, tile]:  # the 64-token path: its first C slots carry mlp2's features, the rest are dropped
        if slot < C:
          np.testing.assert_allclose(embeds[row, p], np.asarray(small)[row, tile, slot], rtol=1e-6)
        assert (seg[row, p] == 0) == (slot >= C)
      else:
        np.testing.assert_allclose(embeds[row, p], np.asarray(full)[row, tile, slot], rtol=1e-6)
        assert seg[row, p] == batch["segment_ids"][row, p]
    kept = seg[row] > 0
    for s in np.unique(seg[row][kept]):  # positions are contiguous over the kept tokens of each sample
      np.testing.assert_array_equal(pos[row][seg[row] == s], np.arange(np.sum(seg[row] == s)))


def test_consistency_step_is_eq7_against_torch_and_never_updates_the_reference(models):
  ref, policy = models
  batch = make_batch()
  step, state, _, ref_params, placed = _setup("vico_consistency", models, batch)
  ref_before = jax.tree.map(np.asarray, ref_params)
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  compress = _compress_of_first_step(batch)
  assert compress.any() and not compress[batch["tile_image"] >= 0].all()  # this draw mixes both paths
  r, p = reference_logits(ref, batch), shortened(policy, batch, compress)
  per_sample = [torch_kl(r[row][s], p[row][s]) for row in range(2) for s in r[row]]
  state, metrics = step(state, ref_params, placed)
  np.testing.assert_allclose(float(metrics["kl"]), np.mean(per_sample), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(per_sample), rtol=2e-5)
  tiles = batch["tile_image"] >= 0
  assert float(metrics["compressed_fraction"]) == pytest.approx(compress[tiles].mean())
  for _ in range(3):
    state, metrics = step(state, ref_params, placed)
  assert float(metrics["kl"]) < 0.9 * np.mean(per_sample)  # the policy moves towards the reference
  for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, np.asarray(b))  # π_ref is an input, never updated (nor donated)
  assert set(frozen_before) == set(vico.ROUTER_PARTS)  # the router does not train in stage 1 ...
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_router_step_computes_eq8_eq9_by_hand_and_trains_only_the_router(models):
  ref, policy = models
  batch = make_batch()
  step, state, window, ref_params, placed = _setup("vico_router", models, batch, window=16)
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  router_before = jax.tree.map(np.asarray, state.params)
  r_ref = reference_logits(ref, batch)
  kl_at = lambda compress: [{s: torch_kl(r_ref[row][s], lg) for s, lg in per.items()}
                            for row, per in enumerate(shortened(policy, batch, compress))]
  base = kl_at(np.zeros((2, 4), bool))
  ratios = []
  for row in range(2):
    for i in range(4):
      if batch["tile_image"][row, i] < 0:
        continue
      onehot = np.zeros((2, 4), bool)
      onehot[row, i] = True
      s = batch["tile_segment"][row, i]
      ratios.append((kl_at(onehot)[row][s] + 1e-6) / (base[row][s] + 1e-6))
  ratios = np.array(ratios)
  tau = np.percentile(ratios, 50)
  labels = (ratios >= tau).astype(int)
  b, r = batch["tile_image"].shape
  _, _, p0 = policy.flash_features(jnp.asarray(batch["pixel_values"]).reshape(b * r, SIZE, SIZE, 3))
  p0 = np.asarray(p0, np.float64)[(batch["tile_image"] >= 0).reshape(-1)]
  ce = np.mean(-np.log(np.where(labels == 0, p0, 1 - p0)))

  state, window, metrics = step(state, window, ref_params, placed)
  np.testing.assert_allclose(np.asarray(window.values)[:len(ratios)], ratios, rtol=1e-4)
  assert np.isnan(np.asarray(window.values)[len(ratios):]).all() and int(window.count) == len(ratios)
  np.testing.assert_allclose(float(metrics["tau"]), tau, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), ce, rtol=1e-4)
  assert float(metrics["compressed_fraction"]) == pytest.approx(np.mean(labels == 0))
  predicted = np.where(p0 > 0.5, 0, 1)
  assert float(metrics["router_accuracy"]) == pytest.approx(np.mean(predicted == labels))
  np.testing.assert_allclose(float(metrics["kl"]), np.mean([v for row in base for v in row.values()]), rtol=2e-5)

  for _ in range(2):
    state, window, metrics = step(state, window, ref_params, placed)
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))  # ViT, mlp1, mlp2 and LLM bitwise unchanged
  assert set(state.params) == set(vico.ROUTER_PARTS)
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(router_before),
                                                                   jax.tree.leaves(state.params)))
  assert int(window.count) == 3 * len(ratios)  # 18 values in 16 slots: the ring wrapped
  assert not np.isnan(np.asarray(window.values)).any()


def test_window_is_a_ring_and_tau_its_percentile():
  w = vico.window_init(5)
  w = vico.window_push(w, jnp.array([[1.0, 2.0], [3.0, 9.0]]), jnp.array([[True, True], [True, False]]))
  np.testing.assert_array_equal(np.asarray(w.values)[:3], [1, 2, 3])
  np.testing.assert_allclose(float(vico.threshold(w, 25)), np.percentile([1, 2, 3], 25))
  w = vico.window_push(w, jnp.array([4.0, 5.0, 6.0]), jnp.array([True, True, True]))
  np.testing.assert_array_equal(np.asarray(w.values), [6, 2, 3, 4, 5])  # the oldest value was overwritten
  np.testing.assert_allclose(float(vico.threshold(w, 80)), np.percentile([2, 3, 4, 5, 6], 80))
  np.testing.assert_array_equal(np.asarray(vico.router_labels(jnp.array([1.0, 4.0, 5.0]), 4.0)), [0, 1, 1])
  with pytest.raises(ValueError, match="vico.window=5 is smaller than the 8 tile slots"):
    vico.check_window(5, 8)


@pytest.mark.parametrize("stage", ["vico_consistency", "vico_router"])
def test_eight_devices_equal_one(models, stage):
  batch = make_batch(rows=(((2, 1), (1,)), ((3,),), ((1,), (1,), (1,)), ((2,),)), seed=3)
  runs = []
  for shape in ({"fsdp": 1}, {"fsdp": 4, "tensor": 2}):
    step, state, window, ref_params, placed = _setup(stage, models, batch, shape, lr=1e-3)
    history = []
    for _ in range(3):  # the first step has lr 0 (warmup)
      if stage == "vico_router":
        state, window, metrics = step(state, window, ref_params, placed)
      else:
        state, metrics = step(state, ref_params, placed)
      history.append(jax.device_get(metrics))
    runs.append((history, jax.device_get(state.params)))
  (h1, p1), (h8, p8) = runs
  for m1, m8 in zip(h1, h8):
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
