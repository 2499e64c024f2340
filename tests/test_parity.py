"""Numerical parity with transformers' InternVLForConditionalGeneration (float32): vision features,
projector output and logits, with several tiles and images per batch and padding; both checkpoint
layouts; Qwen3-MoE with and without top-k renormalisation; the MoE load-balancing loss; GELU, LayerNorm
and RMSNorm against torch."""
import numpy as np
import pytest
import torch

import internvl_jax as ij
from conftest import make_batch

# max |ours - ref| <= TOL * max |ref|. Measured (float32, every comparison here and in test_vision): 5.1e-7 to
# 1.1e-6 (InternViT hidden states, dense). 3e-6 leaves a 2.7x margin, and still fails an InternViT with the
# tanh GELU (1.2e-5) or layer_norm_eps 1e-5 instead of 1e-6 (5e-6), which the former 1e-4 let through.
TOL = 3e-6


def close(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f"{what}: relative error {err / scale:.2e}")
  assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL} * {scale:.3g}"


def reference(hf, ids, mask, pixels):
  with torch.no_grad():
    px = torch.tensor(pixels).permute(0, 3, 1, 2)
    vit = hf.model.vision_tower(pixel_values=px).last_hidden_state.numpy()
    feats = hf.model.get_image_features(pixel_values=px).pooler_output.numpy()
    logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=px).logits.numpy()
  return vit, feats, logits


@pytest.fixture(scope="module")
def batch():
  return make_batch()


@pytest.mark.parametrize("variant", ["dense", "moe", "vit6b"])
def test_parity_hf_layout(hf_checkpoint, batch, variant):
  path, hf = hf_checkpoint(variant)
  ids, mask, pixels = batch
  vit, feats, logits = reference(hf, ids, mask, pixels)
  model = ij.from_pretrained(path)
  close(model.vision_model(pixels), vit, "InternViT hidden states")
  close(model.image_features(pixels), feats, "projector output")
  ours = ij.forward(model, ids, pixels, mask)
  valid = mask.astype(bool)
  close(np.asarray(ours)[valid], logits[valid], "logits")


@pytest.mark.parametrize("variant", ["dense", "moe", "vit6b"])
def test_original_layout_roundtrip(hf_checkpoint, batch, tmp_path, variant):
  """Export to the original InternVL layout (REFERENCE.md §7.1-7.2) and read it back."""
  path, hf = hf_checkpoint(variant)
  ids, mask, pixels = batch
  _, _, logits = reference(hf, ids, mask, pixels)
  ij.save_pretrained(ij.from_pretrained(path), str(tmp_path), layout="original")
  import json
  from internvl_jax.checkpoint.safetensors_io import Checkpoint
  keys = set(Checkpoint(str(tmp_path)).keys())
  assert "vision_model.encoder.layers.0.attn.qkv.weight" in keys and "mlp1.1.weight" in keys
  assert json.load(open(tmp_path / "config.json"))["llm_config"]["architectures"][0].startswith("Qwen3")
  model = ij.from_pretrained(str(tmp_path))
  valid = mask.astype(bool)
  close(np.asarray(ij.forward(model, ids, pixels, mask))[valid], logits[valid], "logits (original layout)")


@pytest.mark.parametrize("variant", ["vit6b", "moe"])
def test_hf_layout_roundtrip_through_transformers(hf_checkpoint, batch, tmp_path, variant):
  """Our sharded hf-layout export loads in transformers and in our loader, with identical logits."""
  from transformers import InternVLForConditionalGeneration
  path, hf = hf_checkpoint(variant)
  ids, mask, pixels = batch
  _, _, logits = reference(hf, ids, mask, pixels)
  ij.save_pretrained(ij.from_pretrained(path), str(tmp_path), layout="hf", max_shard_size=200_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  reloaded = InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  _, _, logits2 = reference(reloaded, ids, mask, pixels)
  np.testing.assert_array_equal(logits2, logits)
  valid = mask.astype(bool)
  close(np.asarray(ij.forward(ij.from_pretrained(str(tmp_path)), ids, pixels, mask))[valid], logits[valid],
        "logits (re-exported hf layout)")


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_in_memory_key_spelling(hf_checkpoint, batch, tmp_path, variant):
  """transformers' state_dict() names (model.vision_tower.*, lm_head.weight, fused MoE experts
  mlp.experts.gate_up_proj / down_proj) load like the saved ones."""
  from safetensors.torch import save_file
  import shutil
  path, hf = hf_checkpoint(variant)
  save_file({k: v.clone().contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
  shutil.copy(f"{path}/config.json", tmp_path / "config.json")
  ids, mask, pixels = batch
  _, _, logits = reference(hf, ids, mask, pixels)
  valid = mask.astype(bool)
  close(np.asarray(ij.forward(ij.from_pretrained(str(tmp_path)), ids, pixels, mask))[valid], logits[valid],
        "logits (in-memory key names)")


def test_tied_config_with_a_distinct_lm_head_loads_untied(hf_checkpoint, batch, tmp_path):
  """As transformers: tie_word_embeddings=true but a different lm_head in the file -> untied, warned."""
  import json
  import shutil
  from transformers import InternVLForConditionalGeneration
  path, hf = hf_checkpoint("dense")
  shutil.copy(f"{path}/model.safetensors", tmp_path / "model.safetensors")
  cfg = json.load(open(f"{path}/config.json"))
  cfg["tie_word_embeddings"] = True
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  ids, mask, pixels = batch
  _, _, logits = reference(InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval(), ids, mask, pixels)
  _, _, untied = reference(hf, ids, mask, pixels)
  np.testing.assert_array_equal(logits, untied)
  with pytest.warns(UserWarning, match="loading it untied"):
    model = ij.from_pretrained(str(tmp_path))
  valid = mask.astype(bool)
  close(np.asarray(ij.forward(model, ids, pixels, mask))[valid], logits[valid], "logits (tied flag, own lm_head)")


def test_moe_aux_loss_matches_transformers(hf_checkpoint, batch):
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
  path, hf = hf_checkpoint("moe")
  ids, mask, pixels = batch
  with torch.no_grad():
    out = hf.model.language_model(inputs_embeds=hf.model.get_input_embeddings()(torch.tensor(ids)),
                                  attention_mask=torch.tensor(mask), output_router_logits=True)
    cfg = hf.config.text_config
    ref = float(load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                         torch.tensor(mask)))
  model = ij.from_pretrained(path)
  text_only = np.where(ids == 500, 7, ids)  # the same tokens as the reference, without images
  with torch.no_grad():
    out = hf.model.language_model(input_ids=torch.tensor(text_only), attention_mask=torch.tensor(mask),
                                  output_router_logits=True)
    ref = float(load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                         torch.tensor(mask)))
  _, aux = ij.forward(model, text_only, None, mask, return_aux=True)
  assert abs(float(aux["moe_aux_loss"]) - ref) <= 1e-5 * abs(ref), (float(aux["moe_aux_loss"]), ref)


def test_select_layer(hf_checkpoint, batch):
  """vision_feature_layer = -2 uses the output of the second-to-last ViT layer; the last is not loaded."""
  from conftest import build_hf
  hf = build_hf("dense", vision_feature_layer=-2)
  ids, mask, pixels = batch
  _, feats, _ = reference(hf, ids, mask, pixels)
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = ij.from_pretrained(d)
  assert len(model.vision_model.layers) == 1
  close(model.image_features(pixels), feats, "projector output, select_layer -2")


def test_moe_without_topk_renormalisation(monkeypatch, batch, tmp_path):
  """norm_topk_prob=False (Qwen3MoeConfig's default): the experts' outputs are weighted by their raw
  router probabilities. Text only, so that just the decoder compiles."""
  import conftest
  moe = conftest.VARIANTS["moe"]
  monkeypatch.setitem(conftest.VARIANTS, "moe_raw_topk", {**moe, "text": {**moe["text"], "norm_topk_prob": False}})
  hf = conftest.build_hf("moe_raw_topk", seed=1)
  hf.save_pretrained(str(tmp_path))
  ids, mask, _ = batch
  text_only = np.where(ids == conftest.IMAGE_TOKEN, 7, ids)
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(text_only), attention_mask=torch.tensor(mask)).logits.numpy()
  model = ij.from_pretrained(str(tmp_path))
  assert not model.cfg.text.norm_topk_prob
  valid = mask.astype(bool)
  close(np.asarray(ij.forward(model, text_only, None, mask))[valid], logits[valid], "logits (norm_topk_prob=False)")


def rows_at_every_scale(dim: int, seed: int = 0):
  """[8, 3, dim] float32: rows at scales 0 and 1e-4 .. 1e4 (at the small ones eps is most of the variance, the
  large ones are the massive activations ViTs and LLMs produce), each as a centred row, a row with mean 3x its
  spread (which a norm that forgets to centre gets wrong) and a row with a 100x outlier channel."""
  rng = np.random.RandomState(seed)
  scales = np.array([0, 1e-4, 1e-3, 1e-2, 1, 30, 1e3, 1e4])
  x = rng.randn(len(scales), 3, dim) * scales[:, None, None]
  x[:, 1] += 3 * scales[:, None]
  x[:, 2, 5] = 100 * scales
  return x.astype(np.float32)


# Measured against torch on these rows: at most 9.5e-7 absolute (2 float32 ulps of the largest outputs, ~5).
# 4e-6 leaves a margin for other CPUs' vectorisation; a 1e-5 vs 1e-6 eps already moves the 1e-2 rows by 4%.
NORM_ATOL = 4e-6


@pytest.mark.parametrize("eps", [1e-6, 1e-5])  # InternViT's layer_norm_eps; the projector's nn.LayerNorm default
def test_layer_norm_matches_torch(eps):
  from flax import nnx
  from internvl_jax.model.layers import LayerNorm
  dim = 96
  x = rows_at_every_scale(dim)
  rng = np.random.RandomState(1)
  w, b = (1 + 0.3 * rng.randn(dim)).astype(np.float32), (0.1 * rng.randn(dim)).astype(np.float32)
  norm = LayerNorm(dim, eps, param_dtype=np.float32, rngs=nnx.Rngs(0))
  norm.weight[...], norm.bias[...] = w, b
  ref = torch.nn.functional.layer_norm(torch.tensor(x), (dim,), torch.tensor(w), torch.tensor(b), eps).numpy()
  np.testing.assert_allclose(np.asarray(norm(x)), ref, rtol=0, atol=NORM_ATOL)


def test_rms_norm_matches_transformers():
  """As Qwen3RMSNorm (and InternVLVisionRMSNorm, the same code) computes it: float32, variance in float32,
  the weight multiplied last."""
  from flax import nnx
  from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
  from internvl_jax.model.layers import RMSNorm
  dim, eps = 96, 1e-6  # Qwen3's rms_norm_eps and InternViT-6B's layer_norm_eps
  x = rows_at_every_scale(dim)
  w = (1 + 0.3 * np.random.RandomState(1).randn(dim)).astype(np.float32)
  norm = RMSNorm(dim, eps, param_dtype=np.float32, rngs=nnx.Rngs(0))
  norm.weight[...] = w
  ref_norm = Qwen3RMSNorm(dim, eps)
  with torch.no_grad():
    ref_norm.weight.copy_(torch.tensor(w))
    ref = ref_norm(torch.tensor(x)).numpy()
  assert np.all(ref[0] == 0)  # the zero row: eps keeps it finite
  np.testing.assert_allclose(np.asarray(norm(x)), ref, rtol=0, atol=NORM_ATOL)


def test_gelu_is_exact_erf_gelu():
  """ACT2FN['gelu'] / nn.GELU() is the erf form; the tanh approximation differs by up to 5e-4 near |x| ~ 2."""
  from internvl_jax.model.layers import gelu
  x = np.concatenate([np.linspace(-12, 12, 4801), 3 * np.random.RandomState(0).randn(4000), [-1e4, 1e4]])
  x = x.astype(np.float32)
  ref = torch.nn.functional.gelu(torch.tensor(x)).numpy()
  # measured: at most 4.8e-7 (1 ulp at the outputs near 12); relative 1e-6 where the tail is not ~0
  np.testing.assert_allclose(np.asarray(gelu(x)), ref, rtol=1e-6, atol=2e-6)
