"""The MPO and GSPO train steps: at the reference / rollout point their terms take closed-form values,
training moves the policy the right way, and 8 simulated devices equal 1."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from internvl_jax import sharding, zoo
from internvl_jax.training import optim
from internvl_jax.training import sft
from internvl_jax.model.internvl import init_model
from internvl_jax.training.rl import gspo, losses, mpo

TPT = 4  # tokens per tile of the tiny presets


def pair_batch(cfg, pairs=4, length=24, seed=0):
  """P chosen rows then P rejected rows: a shared prompt (one image in even pairs) and different replies."""
  rng = np.random.default_rng(seed)
  rows = 2 * pairs
  b = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "segment_ids", "position_ids")}
  b["labels"] = np.full((rows, length), -100, np.int32)
  b["loss_weights"] = np.zeros((rows, length), np.float32)
  size = cfg.vision.image_size
  b["pixel_values"] = np.zeros((rows, 1, size, size, 3), np.float32)
  for p in range(pairs):
    prompt = rng.integers(1, 400, int(rng.integers(8, 12)))
    if p % 2 == 0:
      prompt[1:1 + TPT] = cfg.image_token_id
      b["pixel_values"][[p, pairs + p], 0] = rng.standard_normal((size, size, 3))
    for r in (p, pairs + p):
      reply = rng.integers(1, 400, int(rng.integers(3, 8)))
      ids = np.concatenate([prompt, reply])
      n = len(ids)
      b["input_ids"][r, :n], b["segment_ids"][r, :n], b["position_ids"][r, :n] = ids, 1, np.arange(n)
      b["labels"][r, len(prompt):n] = reply
      b["loss_weights"][r, len(prompt):n] = 1.0
  return b


def _train_state(mesh_shape, trainable, lr, preset="tiny-dense"):
  """A tiny model on a mesh of that shape: (cfg, mesh, graphdef, all params, rest, tx, state placed in
  its shardings, the shardings)."""
  cfg = zoo.get(preset)
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  graphdef, params, rest = nnx.split(init_model(cfg, mesh=mesh), nnx.Param, ...)
  train, frozen = optim.split_trainable(params, trainable)
  ocfg = ml_collections.ConfigDict(dict(lr=lr, warmup=0, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-4, clip_norm=1.0))
  tx, _ = optim.make_optimizer(ocfg, 100)
  state = sft.TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen, opt_state=tx.init(train),
                         key=jax.random.key_data(jax.random.key(0)))
  state_sh = sft.state_shardings(jax.eval_shape(lambda s: s, state), mesh, tx)
  return cfg, mesh, graphdef, params, rest, tx, jax.device_put(state, state_sh), state_sh


def _setup(mesh_shape, lr=1e-3):
  cfg, mesh, graphdef, params, rest, tx, state, state_sh = _train_state(mesh_shape, ("mlp1", "language_model"), lr)
  batch = pair_batch(cfg)
  batch_sh = sft.batch_sharding(mesh, dict(batch, ref_logps=np.zeros((8,), np.float32)))
  step, ref = mpo.make_mpo_step(graphdef, rest, tx, mesh, state_sh, batch_sh)
  batch["ref_logps"] = np.asarray(ref(params, jax.device_put(batch, {k: batch_sh[k] for k in batch})))
  return state, step, jax.device_put(batch, batch_sh)


def _run(mesh_shape, steps):
  state, step, batch = _setup(mesh_shape)
  bco, history = losses.bco_init(), []
  for _ in range(steps):
    state, bco, metrics = step(state, bco, batch)
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params), bco


def test_first_step_sits_at_the_reference_and_training_raises_the_margin():
  history, _, bco = _run({"fsdp": 1}, steps=6)
  first = history[0]
  # policy == reference: every reward is 0, so sigmoid = log 2, bco_pair = 2 log 2 (δ = 0)
  np.testing.assert_allclose(first["loss/sigmoid"], np.log(2), rtol=1e-5)
  np.testing.assert_allclose(first["loss/bco_pair"], 2 * np.log(2), rtol=1e-5)
  np.testing.assert_allclose(first["rewards/margins"], 0, atol=1e-5)
  assert history[-1]["rewards/margins"] > 0.05 and history[-1]["loss/sigmoid"] < np.log(2)
  assert float(bco.count) == pytest.approx(6)


def test_eight_devices_equal_one():
  one, p1, b1 = _run({"fsdp": 1}, steps=3)  # the first step has lr 0 (warmup), so two of them move
  eight, p8, b8 = _run({"fsdp": 4, "tensor": 2}, steps=3)
  for m1, m8 in zip(one, eight):
    for k in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "bco/delta"):
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(b8.mean), float(b1.mean), rtol=2e-5, atol=1e-7)


def _gspo_setup(mesh_shape, policy_loss="gspo", preset="tiny-dense"):
  """8 rollouts (2 prompts x G = 4), rewards fixed per response; old log-probs from the starting policy."""
  cfg, mesh, graphdef, params, rest, tx, state, state_sh = _train_state(mesh_shape, ("language_model",), 3e-4,
                                                                        preset)
  batch = pair_batch(cfg, pairs=4, seed=1)
  rewards = np.array([1, 0, 0, 1, 1, 1, 0, 0], np.float32).reshape(2, 4)
  batch["advantages"] = np.asarray(losses.group_advantages(rewards)).reshape(-1)
  with jax.set_mesh(mesh):
    old, _ = jax.jit(lambda p, b: losses.policy_token_logps(nnx.merge(graphdef, p, rest), b))(params, batch)
  batch["old_logps"] = np.asarray(old)
  batch_sh = sft.batch_sharding(mesh, batch)
  step = gspo.make_gspo_step(graphdef, rest, tx, mesh, state_sh, batch_sh, policy_loss=policy_loss)
  forward = jax.jit(lambda p, f, b: nnx.merge(graphdef, p, f, rest)(
      b["input_ids"], b["pixel_values"], position_ids=b["position_ids"], segment_ids=b["segment_ids"]).logits)
  logits = lambda params, frozen: np.asarray(sft.under_mesh(forward, mesh)(params, frozen, batch), np.float64)
  return state, step, jax.device_put(batch, batch_sh), batch, logits


def _gspo_run(mesh_shape, steps, **kw):
  state, step, batch, _, _ = _gspo_setup(mesh_shape, **kw)
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params)


def _starts_at_ratio_one_and_follows_the_advantages(history):
  # on-policy: every ratio is 1, nothing is clipped, and the loss is -mean(A) = 0 for normalised groups
  np.testing.assert_allclose(history[0]["ratio_mean"], 1.0, rtol=1e-6)
  assert history[0]["clip_frac"] == 0
  np.testing.assert_allclose(history[0]["loss"], 0.0, atol=1e-6)
  # the policy moves towards the rewarded responses: the surrogate (-A · ratio) falls below 0
  assert history[-1]["loss"] < -1e-3


def test_grpo_step_starts_at_ratio_one_and_follows_the_advantages():
  _starts_at_ratio_one_and_follows_the_advantages(_gspo_run({"fsdp": 1}, steps=5, policy_loss="grpo")[0])


def _gspo_by_hand(logits, batch, eps=0.2):
  """GSPO's step metrics from the logits [B, L, V] in numpy float64: per-token log-probs by log_softmax, the
  sequence ratio s_i = exp(mean over response tokens of (log π − log π_old)), the PPO clip per sequence, and
  seq-mean-token-mean (every token of a response carries the same term, so it is the mean over responses)."""
  targets, adv = batch["labels"][:, 1:], batch["advantages"].astype(np.float64)
  mask = targets != -100
  z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  new = np.take_along_axis(logp, np.where(mask, targets, 0)[..., None], -1)[..., 0]
  s = np.exp(np.where(mask, new - batch["old_logps"], 0.0).sum(-1) / mask.sum(-1))
  loss = np.mean(np.maximum(-adv * s, -adv * np.clip(s, 1 - eps, 1 + eps)))
  low, high = (s < 1 - eps) & (adv < 0), (s > 1 + eps) & (adv > 0)
  return s, {"loss": loss, "ratio_mean": s.mean(), "clip_frac": np.mean(low | high), "clip_frac_low": low.mean(),
             "clip_frac_high": high.mean()}


def test_gspo_step_starts_at_ratio_one_then_matches_a_hand_computation():
  """At the rollout point the closed form; off it (old log-probs still the rollout's, parameters moved by one
  and then two optimiser steps; the first step has lr 0), each step's loss and ratio / clip metrics equal a
  numpy computation from an independent forward of the parameters that step saw."""
  state, step, batch_dev, batch, logits = _gspo_setup({"fsdp": 1})
  history, ratios = [], []
  for k in range(5):
    params, frozen = jax.device_get(state.params), jax.device_get(state.frozen)  # what step k is computed at
    state, metrics = step(state, batch_dev)
    history.append(jax.device_get(metrics))
    if k not in (2, 3):
      continue
    s, want = _gspo_by_hand(logits(params, frozen), batch)
    # the clip decisions are well defined: no ratio within 1e-3 of a clip edge
    assert np.min(np.abs(s[:, None] - np.array([0.8, 1.2]))) > 1e-3
    ratios.append(s)
    for name, value in want.items():
      np.testing.assert_allclose(history[k][name], value, rtol=1e-4, atol=1e-6,
                                 err_msg=f"step {k} {name}")
  assert np.max(np.abs(ratios[0] - 1)) > 5e-3  # the ratio left 1 after the first update
  last = ratios[-1]
  assert np.any((last > 1.2) | (last < 0.8)) and np.any((last > 0.8) & (last < 1.2))  # clipped and not
  _starts_at_ratio_one_and_follows_the_advantages(history)


@pytest.mark.parametrize("preset,mesh8", [("tiny-dense", {"fsdp": 4, "tensor": 2}),
                                           ("tiny-gpt-oss", {"fsdp": 2, "tensor": 2, "expert": 2})])
def test_gspo_step_eight_devices_equal_one(preset, mesh8):
  one, p1 = _gspo_run({"fsdp": 1}, steps=3, preset=preset)
  eight, p8 = _gspo_run(mesh8, steps=3, preset=preset)
  for m1, m8 in zip(one, eight):
    for k in ("loss", "ratio_mean", "clip_frac"):
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
