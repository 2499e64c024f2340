"""Model behaviour beyond parity: image-token checks, packed rows, sharding over 8 devices, remat,
bfloat16, and checkpoint error reporting."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import internvl_jax as ij
from internvl_jax import sharding, zoo
from conftest import make_batch


@pytest.fixture(scope="module")
def tiny_moe():
  return ij.init_model(zoo.get("tiny-moe"), seed=1)


def test_image_token_count_mismatch_is_an_error(tiny_moe):
  ids, mask, pixels = make_batch()
  with pytest.raises(ValueError, match="IMG_CONTEXT.*hold 16 image tokens.*give 12"):
    tiny_moe(ids, pixels[:-1], mask)
  with pytest.raises(ValueError, match="IMG_CONTEXT"):
    tiny_moe(ids, None, mask)
  # ij.forward checks the count on the host, so the error is raised by the call itself (not by a device
  # callback that the CPU client may report on a later, unrelated dispatch) and nothing is left pending.
  with pytest.raises(ValueError, match="IMG_CONTEXT.*hold 16 image tokens.*give 12"):
    ij.forward(tiny_moe, ids, pixels[:-1], mask)
  with pytest.raises(ValueError, match="IMG_CONTEXT.*hold 16 image tokens.*give 0"):
    ij.forward(tiny_moe, ids, None, mask)
  jax.effects_barrier()
  np.asarray(ij.forward(tiny_moe, ids, pixels, mask))


def test_bad_call_arguments(tiny_moe):
  ids, mask, pixels = make_batch()
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 512\)"):
    ij.forward(tiny_moe, np.where(ids == 0, -100, ids), pixels, mask)
  with pytest.raises(ValueError, match=r"outside the vocabulary"):
    tiny_moe(ids + 1000, pixels, mask)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 21\), input_ids \(2, 21\)"):
    tiny_moe(ids, pixels, mask[:1])
  with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, H, W, 3\]"):
    tiny_moe(ids, pixels[0], mask)


def test_packed_rows_do_not_attend_across_samples(tiny_moe):
  """Two samples packed in one row with segment ids and per-sample positions = each run alone."""
  rng = np.random.RandomState(0)
  a, b = rng.randint(0, 400, 7), rng.randint(0, 400, 5)
  alone_a = np.asarray(ij.forward(tiny_moe, a[None]))[0]
  alone_b = np.asarray(ij.forward(tiny_moe, b[None]))[0]
  packed = np.concatenate([a, b, [0, 0]])[None]
  seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
  pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
  out = np.asarray(ij.forward(tiny_moe, packed, segment_ids=seg, position_ids=pos))[0]
  np.testing.assert_allclose(out[:7], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[7:12], alone_b, atol=1e-5)


@pytest.mark.parametrize("preset,mesh_shape", [("tiny-dense", {"data": 2, "fsdp": 2, "tensor": 2}),
                                                ("tiny-moe", {"fsdp": 2, "tensor": 2, "expert": 2})])
def test_sharded_init_and_forward_equal_one_device(preset, mesh_shape):
  assert jax.device_count() == 8
  cfg = zoo.get(preset)
  mesh = sharding.make_mesh(mesh_shape)
  ids, mask, pixels = make_batch(seed=5)
  single = ij.init_model(cfg, seed=3)
  want = np.asarray(ij.forward(single, ids, pixels, mask))
  sharded = ij.init_model(cfg, seed=3, mesh=mesh)
  state = nnx.state(sharded, nnx.Param)
  specs = {p: v.get_value().sharding.spec for p, v in nnx.to_flat_state(state)}
  assert any(s != jax.sharding.PartitionSpec(*[None] * len(s)) for s in specs.values())
  flat = dict(nnx.to_flat_state(state))
  for p, v in nnx.to_flat_state(nnx.state(single, nnx.Param)):  # eager vs jitted init: last-bit differences
    np.testing.assert_allclose(np.asarray(flat[p].get_value()), np.asarray(v.get_value()), rtol=1e-6, atol=1e-9)
  with jax.set_mesh(mesh):
    got = ij.forward(sharded, ids, pixels, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_logical_axes_on_every_parameter():
  model = nnx.eval_shape(lambda: ij.InternVL(zoo.get("tiny-moe"), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = getattr(var, "logical_axes", None)
    assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_remat_gives_the_same_gradients():
  ids, mask, pixels = make_batch(seed=6)

  def grads(remat):
    model = ij.init_model(zoo.get("tiny-dense").replace(remat=remat), seed=2)

    def loss(m):
      return jnp.mean(m(ids, pixels, mask).logits ** 2)

    return nnx.state(nnx.jit(nnx.grad(loss))(model), nnx.Param)

  ref = grads("none")
  for policy in ("full", "save_dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads(policy), ref)


def test_bfloat16_compute_tracks_float32(hf_checkpoint):
  path, _ = hf_checkpoint("dense")
  ids, mask, pixels = make_batch()
  f32 = np.asarray(ij.forward(ij.from_pretrained(path), ids, pixels, mask))
  bf16_model = ij.from_pretrained(path, dtype=jnp.bfloat16)
  assert bf16_model.language_model.embed_tokens.get_value().dtype == jnp.bfloat16
  bf16 = np.asarray(ij.forward(bf16_model, ids, pixels, mask)).astype(np.float32)
  valid = mask.astype(bool)
  assert np.abs(bf16[valid] - f32[valid]).max() <= 5e-2 * np.abs(f32[valid]).max()


def test_checkpoint_errors_name_the_keys(hf_checkpoint, tmp_path):
  from safetensors.numpy import load_file, save_file
  path, _ = hf_checkpoint("dense")
  tensors = load_file(os.path.join(path, "model.safetensors"))
  tensors.pop("vision_tower.encoder.layer.1.mlp.fc1.bias")
  tensors["vision_tower.extra.weight"] = np.zeros(3, np.float32)
  tensors["language_model.model.norm.weight"] = np.zeros(7, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
  with pytest.raises(ValueError) as err:
    ij.from_pretrained(str(tmp_path))
  msg = str(err.value)
  assert "missing keys (1): vision_tower.encoder.layer.1.mlp.fc1.bias" in msg
  assert "unexpected keys (1): vision_tower.extra.weight" in msg
  assert "language_model.model.norm.weight: checkpoint (7,), expected (64,)" in msg
  with pytest.raises(FileNotFoundError, match="config.json"):
    ij.from_pretrained(str(tmp_path / "nowhere"))
  cfg = json.load(open(tmp_path / "config.json"))
  cfg["text_config"]["hidden_act"] = "relu"
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  with pytest.raises(NotImplementedError, match="hidden_act='relu'"):
    ij.from_pretrained(str(tmp_path))
  cfg["text_config"].pop("hidden_size")
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="config.json: required field 'hidden_size' is missing"):
    ij.from_pretrained(str(tmp_path))
  cfg.pop("text_config")
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="neither 'llm_config'"):
    ij.from_pretrained(str(tmp_path))


def test_from_pretrained_on_a_mesh(hf_checkpoint):
  """Loading with a Mesh places every tensor in its shard; logits equal the unsharded load."""
  path, _ = hf_checkpoint("moe")
  ids, mask, pixels = make_batch()
  want = np.asarray(ij.forward(ij.from_pretrained(path), ids, pixels, mask))
  mesh = sharding.make_mesh({"data": 2, "tensor": 2, "expert": 2})
  model = ij.from_pretrained(path, mesh=mesh)
  gate = model.language_model.layers[0].mlp.gate.get_value()
  assert gate.sharding.spec == jax.sharding.PartitionSpec("expert", None, "tensor")
  assert len(gate.addressable_shards) == 8 and gate.addressable_shards[0].data.shape == (2, 64, 16)
  with jax.set_mesh(mesh):
    got = ij.forward(model, ids, pixels, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 8})


def test_resave_removes_stale_shards(tmp_path):
  model = ij.init_model(zoo.get("tiny-dense"), seed=4)
  ij.save_pretrained(model, str(tmp_path), max_shard_size=100_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  other = ij.init_model(zoo.get("tiny-dense"), seed=5)
  ij.save_pretrained(other, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
  got = ij.from_pretrained(str(tmp_path)).language_model.embed_tokens.get_value()
  np.testing.assert_array_equal(np.asarray(got), np.asarray(other.language_model.embed_tokens.get_value()))


def test_image_features_seam_equals_pixel_values(tiny_moe):
  """`image_features=` (features computed elsewhere: Flash routing, a vision server) gives the same Output as
  `pixel_values`, through the one merge `embed_inputs` does; a wrong count is still an error."""
  ids, mask, pixels = make_batch()
  want = tiny_moe(ids, pixels, mask)
  feats = tiny_moe.image_features(jnp.asarray(pixels))
  got = tiny_moe(ids, attention_mask=mask, image_features=feats)
  for name in ("logits", "hidden", "moe_aux_loss"):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), atol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(tiny_moe.embed_inputs(jnp.asarray(ids), image_features=feats)),
                             np.asarray(tiny_moe.embed_inputs(jnp.asarray(ids), pixels)), atol=1e-6)
  with pytest.raises(ValueError, match="IMG_CONTEXT.*hold 16 image tokens.*give 12"):
    tiny_moe(ids, attention_mask=mask, image_features=feats[:-1])
  with pytest.raises(ValueError, match="not both"):
    tiny_moe(ids, pixels, mask, image_features=feats)


def test_profiles_name_the_blocks(tiny_moe):
  """jax.named_scope on the model's blocks: the lowered program's op names carry them, as a profile shows."""
  graphdef = nnx.graphdef(tiny_moe)
  ids, mask, pixels = make_batch()
  text = jax.jit(lambda s, i, p, a: nnx.merge(graphdef, s)(i, p, a).logits).lower(
      nnx.state(tiny_moe), ids, pixels, mask).as_text(debug_info=True)
  for scope in ("vision_layer/attention", "vision_layer/mlp", "mlp_projector", "decoder_layer/attention",
                "decoder_layer/moe"):
    assert scope in text, scope


def test_tiles_of_another_size_pass_the_host_checks(tiny_moe):
  """84 px tiles on a 56 px model (the ViT interpolates its position embeddings): 9 features per tile, not
  `tokens_per_tile` (4). ij.forward and generate count features from the tiles' shape, so they accept what
  the model accepts (the first host check assumed `tokens_per_tile` and refused these)."""
  ids, mask, pixels = make_batch(tokens_per_tile=9, image_size=84)
  logits = np.asarray(ij.forward(tiny_moe, ids, pixels, mask))
  np.testing.assert_allclose(logits, np.asarray(tiny_moe(ids, pixels, mask).logits), atol=1e-5)
  first = ij.generate(tiny_moe, ids, pixels, attention_mask=mask, max_new_tokens=1, eos_token_ids=())[:, 0]
  np.testing.assert_array_equal(first, np.argmax(logits[:, -1], axis=-1))
  with pytest.raises(ValueError, match="IMG_CONTEXT.*give 18"):
    ij.forward(tiny_moe, ids, pixels[:2], mask)
  with pytest.raises(ValueError, match="IMG_CONTEXT"):
    ij.generate(tiny_moe, ids, pixels[:2], attention_mask=mask, max_new_tokens=1)
