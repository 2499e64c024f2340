"""InternVL3.5-Flash (ViR): the router and `mlp2` against torch primitives with the same weights, the routing
rule against torch.quantile, the compressed prompt against a forward over a sequence shortened by hand,
thresholds that compress nothing, batched requests against each alone, checkpoints in both layouts, and the
errors bad Flash inputs get."""
import dataclasses
import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import internvl_jax as ij
from internvl_jax import zoo
from internvl_jax.checkpoint.pretrained import from_pretrained, save_pretrained
from internvl_jax.config import FlashConfig
from internvl_jax.inference.engine import engine_for, generate
from internvl_jax.model import vir
from conftest import IMAGE_TOKEN

TINY = zoo.get("tiny-flash")  # 56 px tiles of 4x4 patches: 4 tokens per tile, 1 when compressed
# The digits demo's geometry (56 px tiles of 7 px patches): 16 tokens per tile, 4 when compressed
GEOMETRY = TINY.replace(vision=dataclasses.replace(TINY.vision, patch_size=7),
                        flash=FlashConfig(relative_threshold=0.5, absolute_threshold=0.0))


# ------------------------------------------------------------------------------ torch reference modules

class TorchPooling(torch.nn.Module):
  """The released CrossAttentionPooling, from torch primitives; `steps`: which attn/norm each step uses."""

  def __init__(self, dim, steps):
    super().__init__()
    self.steps = steps
    self.query_token = torch.nn.Parameter(torch.randn(1, dim))
    for k in range(1, 5):
      setattr(self, f"attn{k}", torch.nn.MultiheadAttention(dim, 16, batch_first=True))
      setattr(self, f"norm{k}", torch.nn.LayerNorm(dim))

  def forward(self, tokens):
    x = self.query_token.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    for k in self.steps:
      x = getattr(self, f"norm{k}")(getattr(self, f"attn{k}")(x, tokens, tokens)[0])
    return x.squeeze(1)


class TorchGating(torch.nn.Module):

  def __init__(self, dim):
    super().__init__()
    for k in range(1, 5):
      setattr(self, f"block{k}", torch.nn.Sequential(
          torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(4 * dim, dim),
          torch.nn.Dropout(0.1), torch.nn.LayerNorm(dim)))
    self.gate = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 2))

  def forward(self, x):
    for k in range(1, 5):
      x = x + getattr(self, f"block{k}")(x)
    return torch.softmax(self.gate(x), dim=-1)


class TorchFlash(torch.nn.Module):
  """The Flash modules under their checkpoint names (mlp2, pooling_before_gating, gating), weights randomised
  (norms included, so a mis-mapped key cannot hide)."""

  def __init__(self, dv, dl, steps, seed=0):
    super().__init__()
    torch.manual_seed(seed)
    self.mlp2 = torch.nn.Sequential(
        torch.nn.LayerNorm(16 * dv), torch.nn.Linear(16 * dv, 2 * dl), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(2 * dl, 2 * dl), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(2 * dl, dl))
    self.pooling_before_gating = TorchPooling(dv, steps)
    self.gating = TorchGating(dv)
    with torch.no_grad():
      for name, p in self.named_parameters():
        if p.dim() == 1 and ("norm" in name or name.endswith(("mlp2.0.weight", "5.weight", "gate.0.weight"))):
          p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        elif p.dim() == 1:
          p.copy_(0.1 * torch.randn_like(p))
        else:
          p.copy_(torch.randn_like(p) * (1.5 / p.shape[-1] ** 0.5))
    self.eval()


def torch_pixel_shuffle(x, scale):
  """The released pixel_shuffle (ps_version v2) on [n, w, h, c]."""
  n, w, h, c = x.size()
  x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
  return x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale))).permute(0, 2, 1, 3).contiguous()


@nnx.jit
def flash_features(model, pv):
  return model.flash_features(pv)


@nnx.jit
def vit(model, pv):
  return model.vision_model(pv)


@nnx.jit
def logits_from(model, ids, pv=None, feats=None):
  return model(ids, pv, image_features=feats).logits


def torch_rule(p0, relative, absolute):
  p0 = torch.tensor(np.asarray(p0, np.float32))
  return ((p0 > torch.quantile(p0, relative)) & (p0 >= absolute)).numpy()


@pytest.fixture(scope="module")
def flash_ckpt(tmp_path_factory):
  """A tiny Flash checkpoint (original layout) whose Flash tensors are TorchFlash's -> (folder, TorchFlash)."""
  path = str(tmp_path_factory.mktemp("flash_original"))
  save_pretrained(ij.init_model(TINY, seed=3), path, layout="original")
  ref = TorchFlash(TINY.vision.hidden_size, TINY.text.hidden_size, steps=(1, 2, 2, 2))
  tensors = {}
  for f in glob.glob(os.path.join(path, "*.safetensors")):
    tensors.update(load_file(f))
    os.remove(f)
  flash = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(flash) <= set(tensors), sorted(set(flash) - set(tensors))[:5]
  tensors.update(flash)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return path, ref


def pixels(n, seed=0, size=56):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("pooling,steps", [("released", (1, 2, 2, 2)), ("four", (1, 2, 3, 4))])
def test_router_and_mlp2_equal_torch(flash_ckpt, pooling, steps):
  path, ref = flash_ckpt
  model = from_pretrained(path, flash={"pooling": pooling})
  ref.pooling_before_gating.steps = steps
  pv = pixels(5)
  full, compressed, p0 = flash_features(model, jnp.asarray(pv))
  hidden = torch.tensor(np.asarray(vit(model, jnp.asarray(pv))))
  with torch.no_grad():
    probs = ref.gating(ref.pooling_before_gating(hidden[:, 1:]))
    g = TINY.vision.grid
    e64 = ref.mlp2(torch_pixel_shuffle(hidden[:, 1:].reshape(5, g, g, -1), 0.25).reshape(5, -1, 16 * hidden.shape[-1]))
  assert compressed.shape == (5, TINY.compressed_tokens_per_tile, TINY.text.hidden_size)
  assert full.shape == (5, TINY.tokens_per_tile, TINY.text.hidden_size)
  np.testing.assert_allclose(np.asarray(p0), probs[:, 0].numpy(), atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(compressed), e64.numpy(), atol=2e-5, rtol=1e-4)
  assert np.ptp(probs[:, 0].numpy()) > 1e-3  # the tiles differ, so a wrong mapping would show


def test_the_two_pooling_variants_differ(flash_ckpt):
  pv = jnp.asarray(pixels(3))
  a = flash_features(from_pretrained(flash_ckpt[0]), pv)[2]
  b = flash_features(from_pretrained(flash_ckpt[0], flash={"pooling": "four"}), pv)[2]
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-4


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_route_equals_the_released_rule(n):
  rng = np.random.default_rng(n)
  for relative in (0.0, 0.1, 0.5, 0.9, 1.0):
    for absolute in (0.0, 0.3, 0.5):
      p0 = rng.uniform(0.2, 0.8, n).astype(np.float32)
      got = vir.route(p0, FlashConfig(relative_threshold=relative, absolute_threshold=absolute))
      np.testing.assert_array_equal(got, torch_rule(p0, relative, absolute))
  one = vir.route([0.9], FlashConfig(absolute_threshold=0.5))
  assert not one.any()  # strict >: the quantile of one value is that value, so a lone tile never compresses
  assert vir.route([0.9], FlashConfig(absolute_threshold=0.5, rule="absolute")).all()
  p0 = np.linspace(0.1, 0.9, 9, dtype=np.float32)
  assert not vir.route(p0, FlashConfig(relative_threshold=0.0, absolute_threshold=0.0))[0]  # the lowest never


@pytest.fixture(scope="module")
def geometry_model():
  return ij.init_model(GEOMETRY, seed=5)


def prompt(rng, tiles_per_image):
  """Text, then each image's <img> <IMG_CONTEXT> x tiles x T </img>, then text."""
  t = GEOMETRY.tokens_per_tile
  row = list(rng.integers(1, 400, 5))
  for n in tiles_per_image:
    row += [401] + [IMAGE_TOKEN] * (n * t) + [402] + list(rng.integers(1, 400, 3))
  return np.asarray(row, np.int64)


def test_compressed_prompt_equals_a_forward_over_the_hand_shortened_sequence(geometry_model):
  model, cfg = geometry_model, GEOMETRY
  rng = np.random.default_rng(0)
  ids = prompt(rng, (3, 2))  # two images in one request: 5 tiles routed together
  pv = pixels(5, seed=1)
  engine, state = engine_for(model), nnx.state(model)
  routed = engine.route(state, [ids], pv)
  logits = engine.prefill(state, routed.rows, None, 256, features=routed.features)[0][0]

  full, compressed, p0 = (np.asarray(x) for x in flash_features(model, jnp.asarray(pv)))
  squeeze = torch_rule(p0, 0.5, 0.0)
  assert 0 < squeeze.sum() < 5, squeeze
  t, c = cfg.tokens_per_tile, cfg.compressed_tokens_per_tile
  starts = [i for i in np.flatnonzero(ids == IMAGE_TOKEN) if i == 0 or ids[i - 1] != IMAGE_TOKEN]
  blocks = [s + k * t for s, n in zip(starts, (3, 2)) for k in range(n)]
  drop = [b + j for b, sq in zip(blocks, squeeze) if sq for j in range(c, t)]
  short = np.delete(ids, drop)
  feats = np.concatenate([compressed[i] if sq else full[i] for i, sq in enumerate(squeeze)])
  assert routed.rows[0].tolist() == short.tolist()
  assert routed.stats[0] == {"tiles": 5, "compressed_tiles": int(squeeze.sum()), "visual_tokens_before": 5 * t,
                             "visual_tokens_after": 5 * t - int(squeeze.sum()) * (t - c)}
  want = logits_from(model, jnp.asarray(short[None]), feats=jnp.asarray(feats[None]))[0, -1]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_absolute_threshold_above_one_gives_the_plain_answer(geometry_model):
  """Also: thresholds changed on a model that has generated already take effect (its engine is cached)."""
  rng = np.random.default_rng(1)
  ids, pv = prompt(rng, (4,))[None], pixels(4, seed=2)
  assert generate(geometry_model, ids, pv, max_new_tokens=1, return_stats=True)[1][0]["compressed_tiles"] > 0
  try:
    geometry_model.cfg = GEOMETRY.replace(flash=dataclasses.replace(GEOMETRY.flash, absolute_threshold=1.01))
    flash, logp_f, stats = generate(geometry_model, ids, pv, max_new_tokens=6, flash=True, return_logps=True,
                                    return_stats=True)
  finally:
    geometry_model.cfg = GEOMETRY
  plain, logp_p = generate(geometry_model, ids, pv, max_new_tokens=6, flash=False, return_logps=True)
  assert stats[0]["compressed_tiles"] == 0 and stats[0]["visual_tokens_after"] == 4 * GEOMETRY.tokens_per_tile
  np.testing.assert_array_equal(flash, plain)
  np.testing.assert_allclose(logp_f, logp_p, atol=1e-5)


def test_tiles_of_another_size_route_by_their_own_token_counts(geometry_model):
  """112 px tiles on a 56 px model (the ViT interpolates): 64 tokens per tile, 16 compressed, as the plain path
  counts them; the routed features are those tiles' own."""
  t, c = 64, 16
  ids = np.asarray([7, 8] + [IMAGE_TOKEN] * (3 * t) + [9], np.int64)
  pv = pixels(3, seed=7, size=112)
  engine, state = engine_for(geometry_model), nnx.state(geometry_model)
  routed = engine.route(state, [ids], pv)
  stats = routed.stats[0]
  assert stats["visual_tokens_before"] == 3 * t and 0 < stats["compressed_tiles"] < 3
  assert len(routed.rows[0]) == len(ids) - stats["compressed_tiles"] * (t - c)
  full, compressed, index, n = routed.features
  table = np.concatenate([np.asarray(full).reshape(-1, full.shape[-1]),
                          np.asarray(compressed).reshape(-1, compressed.shape[-1])])
  f, q, p0 = (np.asarray(x) for x in flash_features(geometry_model, jnp.asarray(pv)))
  squeeze = torch_rule(p0, 0.5, 0.0)
  want = np.concatenate([q[i] if sq else f[i] for i, sq in enumerate(squeeze)])
  np.testing.assert_allclose(table[np.asarray(index)[:n]], want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="make 1 tiles of 64 tokens but pixel_values hold 3"):
    engine.route(state, [np.asarray([7] + [IMAGE_TOKEN] * t + [9])], pv)
  with pytest.raises(ValueError, match="has 48 tokens, not a multiple of tokens_per_tile=64"):
    engine.route(state, [np.asarray([7] + [IMAGE_TOKEN] * 48 + [9])], pv)  # 56 px tiles' count, 112 px tiles


def test_a_batch_of_flash_requests_equals_each_request_alone(geometry_model):
  rng = np.random.default_rng(2)
  requests = [(prompt(rng, (3, 1)), pixels(4, seed=3)), (prompt(rng, (1,)), pixels(1, seed=4)),
              (prompt(rng, (2,)), pixels(2, seed=5))]
  alone = [generate(geometry_model, r[None], pv, max_new_tokens=5, return_logps=True, return_stats=True)
           for r, pv in requests]
  width = max(len(r) for r, _ in requests)
  ids, mask = np.zeros((3, width), np.int64), np.zeros((3, width), np.int64)
  for i, (r, _) in enumerate(requests):  # left-padded, as a batch of different lengths is
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  out, logps, stats = generate(geometry_model, ids, np.concatenate([pv for _, pv in requests]), attention_mask=mask,
                               max_new_tokens=5, return_logps=True, return_stats=True)
  assert [s["compressed_tiles"] for s in stats] == [a[2][0]["compressed_tiles"] for a in alone]
  assert len({s["compressed_tiles"] / s["tiles"] for s in stats}) > 1, stats  # different routing outcomes
  assert stats[1]["compressed_tiles"] == 0  # one tile: never compressed under the released rule
  for i, (ids_i, logp_i, stats_i) in enumerate(alone):
    np.testing.assert_array_equal(out[i], ids_i[0])
    np.testing.assert_allclose(logps[i], logp_i[0], atol=1e-4)
    assert stats[i] == stats_i[0]


def test_training_forward_keeps_the_full_token_path(geometry_model):
  rng = np.random.default_rng(3)
  ids, pv = prompt(rng, (2,))[None], pixels(2, seed=6)
  full = flash_features(geometry_model, jnp.asarray(pv))[0]
  np.testing.assert_allclose(np.asarray(logits_from(geometry_model, jnp.asarray(ids), jnp.asarray(pv))),
                             np.asarray(logits_from(geometry_model, jnp.asarray(ids), feats=full)), atol=1e-5)


def test_bad_flash_inputs_get_errors_naming_them(geometry_model, flash_ckpt, tmp_path):
  ids = prompt(np.random.default_rng(4), (2,))
  run = int(np.flatnonzero(ids == IMAGE_TOKEN)[0])
  short = np.delete(ids, [run])  # a run of 2 x 16 - 1 tokens
  with pytest.raises(ValueError, match=f"run at position {run} has 31 tokens, not a multiple of tokens_per_tile=16"):
    generate(geometry_model, short[None], pixels(2), max_new_tokens=2, flash=True)
  with pytest.raises(ValueError, match="flash=True needs a Flash model"):
    generate(nnx.eval_shape(lambda: ij.InternVL(zoo.get("tiny-dense"), rngs=nnx.Rngs(0))), ids[None], None,
             max_new_tokens=1, flash=True)
  path = str(tmp_path / "broken")
  os.makedirs(path)
  tensors = load_file(os.path.join(flash_ckpt[0], "model.safetensors"))
  del tensors["gating.block2.3.weight"]
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(flash_ckpt[0], "config.json")) as f, open(os.path.join(path, "config.json"), "w") as g:
    g.write(f.read())
  with pytest.raises(ValueError, match=r"missing keys \(1\): gating\.block2\.3\.weight"):
    from_pretrained(path)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_flash_checkpoints_round_trip(flash_ckpt, tmp_path, layout):
  model = from_pretrained(flash_ckpt[0], flash={"relative_threshold": 0.25, "absolute_threshold": 0.4})
  save_pretrained(model, str(tmp_path), layout=layout)
  back = from_pretrained(str(tmp_path))
  assert back.cfg.flash == model.cfg.flash
  for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(back, nnx.Param))):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["flash_relative_threshold"] == 0.25 and config["flash_absolute_threshold"] == 0.4
  keys = set(load_file(str(tmp_path / "model.safetensors")))
  if layout == "hf":  # the names of transformers' internvl_flash converter
    assert config["model_type"] == "internvl_flash"
    assert {"model.mlp2.dense1.weight", "model.pooling_before_gating.attn3.key.bias",
            "model.pooling_before_gating.attn1.out_proj.weight", "model.gating.block4.dense_out.weight",
            "model.gating.gate_proj.bias", "model.gating.gate_norm.weight"} <= keys
    bare = {k[len("model."):] if k.startswith("model.mlp2.") else k: v
            for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    save_file(bare, str(tmp_path / "model.safetensors"))  # `mlp2.*` without the `model.` prefix loads too
    assert np.array_equal(np.asarray(from_pretrained(str(tmp_path)).mlp2.dense1.get_value()),
                          np.asarray(model.mlp2.dense1.get_value()))
  else:
    assert {"mlp2.7.weight", "pooling_before_gating.attn4.in_proj_weight", "gating.gate.1.bias"} <= keys


def test_router_weights_without_flash_config_keys_load_with_defaults(flash_ckpt, tmp_path):
  for f in ("model.safetensors",):
    os.symlink(os.path.join(flash_ckpt[0], f), tmp_path / f)
  with open(os.path.join(flash_ckpt[0], "config.json")) as f:
    config = {k: v for k, v in json.load(f).items() if not k.startswith("flash_")}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.warns(UserWarning, match="flash_relative_threshold and flash_absolute_threshold absent"):
    model = from_pretrained(str(tmp_path))
  assert model.cfg.flash == FlashConfig(mode=False)  # the remote code's default: flash_mode off


def test_a_plain_checkpoint_saying_flash_mode_false_loads_plain(tmp_path):
  save_pretrained(ij.init_model(zoo.get("tiny-dense")), str(tmp_path), layout="original")
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**config, "flash_mode": False}, f)
  assert from_pretrained(str(tmp_path)).cfg.flash is None
  with pytest.raises(TypeError, match="flash= takes a dict"):
    from_pretrained(str(tmp_path), flash=False)
