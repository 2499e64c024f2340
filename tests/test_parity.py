"""Numerical parity with transformers' InternVLForConditionalGeneration (float32): vision features,
projector output and logits, with several tiles and images per batch and padding; both checkpoint
layouts; the MoE load-balancing loss."""
import numpy as np
import pytest
import torch

import internvl_jax as ij
from conftest import make_batch

TOL = 1e-4  # max |ours - ref| <= TOL * max |ref|


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
  from internvl_jax.safetensors_io import Checkpoint
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
  import json
  import shutil
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
