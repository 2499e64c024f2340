"""The SFT objective and the pure train step: square averaging against the official formula (computed with
torch), per-row packed images, gradient accumulation, freezing, and 8 simulated devices against 1."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

import internvl_jax as ij
from internvl_jax import sharding, zoo
from internvl_jax.training import optim
from internvl_jax.training import sft
from internvl_jax.model.internvl import forward, init_model

TPT = 4  # tokens per tile of the tiny presets


def packed_batch(cfg, rows=4, length=48, tiles_per_row=3, seed=0):
  """Random packed rows: 1-3 samples per row, each with 0-1 images, labels on the tail of each sample."""
  rng = np.random.default_rng(seed)
  b = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "segment_ids", "position_ids")}
  b["labels"] = np.full((rows, length), -100, np.int32)
  b["loss_weights"] = np.zeros((rows, length), np.float32)
  size = cfg.vision.image_size
  b["pixel_values"] = np.zeros((rows, tiles_per_row, size, size, 3), np.float32)
  for r in range(rows):
    pos, tiles = 0, 0
    for seg in range(1, rng.integers(1, 4) + 1):
      n = int(rng.integers(10, 16))
      if pos + n > length:
        break
      ids = rng.integers(1, 400, n)
      if tiles < tiles_per_row and rng.random() < 0.7:
        ids[1:1 + TPT] = cfg.image_token_id
        b["pixel_values"][r, tiles] = rng.standard_normal((size, size, 3))
        tiles += 1
      sup = int(rng.integers(2, 6))
      b["input_ids"][r, pos:pos + n] = ids
      b["segment_ids"][r, pos:pos + n] = seg
      b["position_ids"][r, pos:pos + n] = np.arange(n)
      b["labels"][r, pos + n - sup:pos + n] = ids[n - sup:]
      b["loss_weights"][r, pos + n - sup:pos + n] = 1 / np.sqrt(sup)
      pos += n
  return b


def test_loss_is_the_official_square_average():
  """sum(CE * w) / sum(w) after the shift, as modeling_internvl_chat computes it (here in torch)."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 12, 50)).astype(np.float32)
  labels = np.where(rng.random((3, 12)) < 0.5, rng.integers(0, 50, (3, 12)), -100).astype(np.int32)
  weights = np.where(labels != -100, rng.random((3, 12)), 0).astype(np.float32)
  ce_sum, w_sum, n = sft.weighted_next_token_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  t_logits, t_labels, t_w = torch.tensor(logits)[:, :-1], torch.tensor(labels)[:, 1:], torch.tensor(weights)[:, 1:]
  ce = torch.nn.functional.cross_entropy(t_logits.reshape(-1, 50), t_labels.reshape(-1).long(), reduction="none")
  ref = (ce * t_w.reshape(-1)).sum() / t_w.sum()
  np.testing.assert_allclose(float(ce_sum / w_sum), float(ref), rtol=1e-6)
  assert int(n) == int((labels[:, 1:] != -100).sum())


def test_per_row_tiles_equal_flat_tiles():
  """pixel_values [B, R, ...] with padding tiles gives the logits of the flat [tiles, ...] layout."""
  cfg = zoo.get("tiny-dense")
  model = init_model(cfg)
  b = packed_batch(cfg)
  counts = (b["input_ids"] == cfg.image_token_id).sum(1) // TPT
  flat = np.concatenate([b["pixel_values"][r, :c] for r, c in enumerate(counts)])
  kw = dict(position_ids=b["position_ids"], segment_ids=b["segment_ids"])
  ours = forward(model, b["input_ids"], b["pixel_values"], **kw)
  ref = forward(model, b["input_ids"], flat, **kw)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _setup(name, mesh_shape, trainable=optim.PARTS, accum=1):
  cfg = zoo.get(name)
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  model = init_model(cfg, mesh=mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  train, frozen = optim.split_trainable(params, trainable)
  # eps 1e-4: Adam's m / sqrt(v) would turn float noise in near-zero gradients into full-size steps.
  ocfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup=2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-4, clip_norm=1.0))
  tx, lr = optim.make_optimizer(ocfg, 10)
  state = sft.TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen, opt_state=tx.init(train),
                         key=jax.random.key_data(jax.random.key(0)))
  abstract = jax.eval_shape(lambda s: s, state)
  state_sh = sft.state_shardings(abstract, mesh, tx)
  state = jax.device_put(state, state_sh)
  batch = packed_batch(cfg, rows=8)
  batch_sh = sft.batch_sharding(mesh, batch)
  step_cfg = sft.StepConfig(accum_steps=accum, aux_loss_coef=cfg.text.router_aux_loss_coef if cfg.text.is_moe else 0)
  step = sft.make_train_step(graphdef, rest, tx, step_cfg, mesh, state_sh, batch_sh, lr)
  return state, step, jax.device_put(batch, batch_sh)


def _run(name, mesh_shape, steps=3, **kw):
  """`steps` steps on one batch -> (losses, grad norms, final params, last metrics). The warmup's first
  learning rate is 0, so only steps 2.. move the parameters: 3 steps compare two updates and a loss after one."""
  state, step, batch = _setup(name, mesh_shape, **kw)
  losses, norms = [], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  assert losses[-1] < losses[0], losses  # the parameters moved (and downhill), so later steps compare updates
  return losses, norms, jax.device_get(state.params), metrics


def _assert_same_params(a, b, rtol=1e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,mesh8", [("tiny-dense", {"fsdp": 4, "tensor": 2}),
                                         ("tiny-moe", {"fsdp": 2, "tensor": 2, "expert": 2}),
                                         ("tiny-gpt-oss", {"fsdp": 2, "tensor": 2, "expert": 2})])
def test_eight_devices_equal_one(name, mesh8):
  one, n1, p1, m1 = _run(name, {"fsdp": 1})
  eight, n8, p8, m8 = _run(name, mesh8)
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  np.testing.assert_allclose(n8, n1, rtol=1e-5)
  _assert_same_params(p1, p8)
  if name != "tiny-dense":
    assert float(m1["moe_aux_loss"]) > 0


def test_accumulation_equals_one_big_batch():
  big, n_big, p_big, _ = _run("tiny-dense", {"fsdp": 2})
  acc, n_acc, p_acc, _ = _run("tiny-dense", {"fsdp": 2}, accum=4)
  np.testing.assert_allclose(acc, big, rtol=1e-5)
  np.testing.assert_allclose(n_acc, n_big, rtol=1e-5)
  _assert_same_params(p_big, p_acc)


def test_frozen_parts_do_not_move_and_carry_no_optimizer_state():
  state, step, batch = _setup("tiny-dense", {"fsdp": 1}, trainable=("mlp1",))
  before = jax.device_get(state.frozen)
  trainable_before = jax.device_get(state.params)
  for _ in range(2):  # the warmup's first learning rate is 0
    state, _ = step(state, batch)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.frozen))):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trainable_before),
                                                      jax.tree.leaves(jax.device_get(state.params))))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert n_opt <= 2 * n_params + 8  # Adam's two moments of mlp1 only (+ counters)


def test_flash_router_is_frozen_in_sft():
  """A Flash model's router and mlp2 are outside the SFT loss: frozen, so weight decay cannot shrink them."""
  model = nnx.eval_shape(lambda: ij.InternVL(zoo.get("tiny-flash"), rngs=nnx.Rngs(0)))
  train, frozen = optim.split_trainable(nnx.state(model, nnx.Param), optim.PARTS)
  assert set(train.keys()) == set(optim.PARTS) and set(frozen.keys()) == set(optim.FLASH_PARTS)
  train, frozen = optim.split_trainable(nnx.state(model, nnx.Param), ("mlp1",))
  assert set(train.keys()) == {"mlp1"} and set(optim.FLASH_PARTS) <= set(frozen.keys())


def test_weight_decay_mask():
  assert optim.decays(("language_model", "layers", 0, "attn", "q_proj"))
  assert optim.decays(("vision_model", "layers", 0, "ls1"))
  assert not optim.decays(("vision_model", "layers", 0, "attn", "qkv_bias"))
  assert not optim.decays(("language_model", "layers", 0, "attn", "q_norm", "weight"))
  assert not optim.decays(("mlp1", "norm", "bias"))
  with pytest.raises(ValueError, match="unknown trainable parts"):
    optim.split_trainable(nnx.State({}), ("vit",))


def test_bfloat16_compute_over_float32_master_weights_with_remat():
  """dtype=bfloat16 + param_dtype=float32 (+ remat) trains float32 weights; its loss tracks the float32 one."""
  cfg = zoo.get("tiny-dense")
  batch = packed_batch(cfg, rows=2)
  losses = {}
  for name, overrides in (("f32", {}), ("bf16", dict(dtype="bfloat16", remat="full"))):
    model = init_model(cfg.replace(**overrides))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ocfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup=0, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=0))
    tx, _ = optim.make_optimizer(ocfg, 10)
    state = sft.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=nnx.State({}),
                           opt_state=tx.init(params), key=jax.random.key_data(jax.random.key(0)))
    state, metrics = jax.jit(lambda s, b: sft.train_step(s, b, graphdef=graphdef, rest=rest, tx=tx,
                                                         cfg=sft.StepConfig()))(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses[name] = float(metrics["loss"])
  np.testing.assert_allclose(losses["bf16"], losses["f32"], rtol=2e-2)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_chunked_loss_equals_full_logits(name):
  """The chunked loss (ragged last chunk) gives the full-logits loss and gradients."""
  cfg = zoo.get(name)
  model = init_model(cfg)
  graphdef, params = nnx.split(model)
  batch = packed_batch(cfg, rows=2)

  def loss(params, chunk):
    (ce, w, _), _ = sft.next_token_terms(nnx.merge(graphdef, params), batch, loss_chunk=chunk)
    return ce / w

  full, g_full = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  chunked, g_chunked = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 13)
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunked)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
