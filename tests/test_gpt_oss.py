"""GPT-OSS (InternVL3.5-20B-A4B) against transformers (float32, tiny random configs of 4 layers alternating a
sliding window of 8 and full attention, sequences of 40+ tokens): the LM alone vs GptOssForCausalLM (logits
and the load-balancing loss), the whole InternVL vs InternVLForConditionalGeneration in both layouts, config
round trips, MXFP4 experts vs transformers' dequantizer, the sliding-window ring cache, the Pallas kernels
(interpret mode) vs XLA, and the parameter count of the 20B preset vs transformers' module.
(Greedy generation: tests/test_generation.py; SFT and GSPO steps on 8 devices: test_sft.py, test_rl_mpo.py.)"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import internvl_jax as ij
from conftest import make_batch
from internvl_jax import zoo
from internvl_jax.checkpoint import mxfp4, safetensors_io
from internvl_jax.inference import engine as engine_lib

# max |ours - ref| <= TOL * max |ref|; measured 3.7e-7 (whole model, hf layout) to 6e-7 (LM alone)
TOL = 3e-6


def close(ours, ref, what, tol=TOL):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f"{what}: relative error {err / scale:.2e}")
  assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.fixture(scope="module")
def batch():
  """make_batch's two rows (images, row 1 left-padded) plus 24 text tokens: 45 positions, past the window."""
  ids, mask, pixels = make_batch()
  ext = np.random.RandomState(1).randint(0, 500, (2, 24))
  return np.concatenate([ids, ext], 1), np.concatenate([mask, np.ones_like(ext)], 1), pixels


def hf_logits(hf, ids, mask, pixels):
  with torch.no_grad():
    px = torch.tensor(pixels).permute(0, 3, 1, 2)
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=px).logits.numpy()


def causal_lm(hf):
  """transformers' GptOssForCausalLM holding the InternVL reference's language model weights."""
  from transformers import GptOssForCausalLM
  lm = GptOssForCausalLM(hf.config.text_config).eval()
  lm.model.load_state_dict(hf.model.language_model.state_dict())
  lm.lm_head.load_state_dict(hf.lm_head.state_dict())
  return lm


def test_config_reads_the_gpt_oss_fields(hf_checkpoint):
  path, hf = hf_checkpoint("gpt_oss")
  t = ij.from_pretrained(path).cfg.text
  ref = hf.config.text_config
  assert t.arch == "gpt_oss" and t.layer_types == tuple(ref.layer_types) and t.sliding_window == 8
  assert [t.window(i) for i in range(4)] == [8, None, 8, None]
  r = ref.rope_parameters
  assert (t.rope_theta, t.rope_scaling.factor, t.rope_scaling.beta_fast, t.rope_scaling.beta_slow,
          t.rope_scaling.original_max_position_embeddings, t.rope_scaling.truncate) == (
              r["rope_theta"], r["factor"], r["beta_fast"], r["beta_slow"], r["original_max_position_embeddings"],
              r["truncate"])
  assert (t.swiglu_limit, t.swiglu_alpha, t.rms_norm_eps, t.num_experts) == (7.0, 1.702, 1e-5, 4)


def test_lm_alone_matches_gpt_oss_for_causal_lm(hf_checkpoint, batch):
  path, hf = hf_checkpoint("gpt_oss")
  ids, mask, _ = batch
  ids = np.where(ids == 500, 7, ids)  # text only
  lm = causal_lm(hf)
  with torch.no_grad():
    out = lm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
  model = ij.from_pretrained(path).language_model
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)  # transformers' default with left padding
  ours = model(model.embed(jnp.asarray(ids)), positions, jnp.asarray(mask, jnp.int32))
  valid = mask.astype(bool)
  close(np.asarray(ours.logits)[valid], out.logits.numpy()[valid], "GPT-OSS logits")
  # transformers' load_balancing_loss_func over the real tokens (the same Switch formula as Qwen3-MoE)
  np.testing.assert_allclose(float(ours.moe_aux_loss), float(out.aux_loss), rtol=1e-5)


def test_whole_model_matches_transformers_in_both_layouts(hf_checkpoint, batch, tmp_path):
  path, hf = hf_checkpoint("gpt_oss")
  ids, mask, pixels = batch
  want = hf_logits(hf, ids, mask, pixels)
  valid = mask.astype(bool)
  model = ij.from_pretrained(path)
  close(np.asarray(ij.forward(model, ids, pixels, mask))[valid], want[valid], "InternVL-GPT-OSS logits (hf)")
  ij.save_pretrained(model, str(tmp_path / "orig"), layout="original")
  with open(tmp_path / "orig" / "config.json") as f:
    c = json.load(f)
  assert c["llm_config"]["architectures"] == ["GptOssForCausalLM"] and c["template"] == "internvl3_5_gpt_oss"
  assert c["llm_config"]["rope_scaling"]["rope_type"] == "yarn" and len(c["llm_config"]["layer_types"]) == 4
  back = ij.from_pretrained(str(tmp_path / "orig"))
  assert back.cfg.text == model.cfg.text
  close(np.asarray(ij.forward(back, ids, pixels, mask))[valid], want[valid], "InternVL-GPT-OSS logits (original)")
  # and our transformers-layout export is what transformers loads
  from transformers import InternVLForConditionalGeneration
  ij.save_pretrained(back, str(tmp_path / "hf"), layout="hf")
  again = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
  close(hf_logits(again, ids, mask, pixels)[valid], want[valid], "transformers on our hf export")


def _pack(rng, rows, cols):
  """Random MXFP4 blocks [E, rows, cols/32, 16] and scales near 2^0."""
  e = 4
  return (rng.integers(0, 256, (e, rows, cols // 32, 16), dtype=np.uint8),
          rng.integers(122, 130, (e, rows, cols // 32), dtype=np.uint8))


def test_mxfp4_experts_load_as_transformers_dequantizes_them(hf_checkpoint, tmp_path):
  """An original-layout checkpoint whose experts are stored as the gpt-oss release stores them."""
  from safetensors.numpy import save_file
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  path, _ = hf_checkpoint("gpt_oss")
  model = ij.from_pretrained(path)
  ij.save_pretrained(model, str(tmp_path), layout="original")
  ckpt = safetensors_io.Checkpoint(str(tmp_path))
  tensors = {k: np.asarray(ckpt.get(k)) for k in ckpt.keys()}
  rng, want = np.random.default_rng(0), {}
  d, i = model.cfg.text.hidden_size, model.cfg.text.moe_intermediate_size
  for layer in range(4):
    for name, rows, cols in (("gate_up_proj", 2 * i, d), ("down_proj", d, i)):
      key = f"language_model.model.layers.{layer}.mlp.experts.{name}"
      del tensors[key]
      blocks, scales = _pack(rng, rows, cols)
      tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
      want[(layer, name)] = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales),
                                                       dtype=torch.float32).numpy()
  for f in tmp_path.glob("*.safetensors*"):
    f.unlink()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  loaded = ij.from_pretrained(str(tmp_path))
  for (layer, name), ref in want.items():
    mlp = loaded.language_model.layers[layer].mlp
    ours = np.asarray((mlp.gate_up if name == "gate_up_proj" else mlp.down).get_value())
    np.testing.assert_array_equal(ours, ref, err_msg=f"layer {layer} {name}")
  # a lone half of a pair is named
  del tensors["language_model.model.layers.0.mlp.experts.down_proj_scales"]
  (tmp_path / "model.safetensors").unlink()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="down_proj_blocks"):
    ij.from_pretrained(str(tmp_path))


def test_packed_slices_read_only_their_groups():
  rng = np.random.default_rng(1)
  blocks, scales = _pack(rng, 48, 96)
  whole = mxfp4.dequantize(blocks, scales)
  lazy = mxfp4.Packed(blocks, scales)
  assert lazy.shape == whole.shape == (4, 96, 48)
  for index, groups in [((slice(1, 3),), 3), ((slice(None), slice(40, 70), slice(5, 20)), 2),
                        ((slice(0, 1), slice(33, 34)), 1)]:
    part = lazy[index]
    np.testing.assert_array_equal(np.asarray(part), whole[index])
    assert part.blocks.shape[2] == groups  # only the groups of 32 that the input slice touches


def test_ring_cache_holds_the_window_only():
  cfg = zoo.get("InternVL3.5-20B-A4B").replace(dtype="bfloat16")
  shapes = jax.eval_shape(lambda: engine_lib.init_cache(cfg, 1, 32768))
  slots = [k.shape[-1] for k in shapes["k"]]
  assert slots == [128 if i % 2 == 0 else 32768 + engine_lib.CACHE_SLACK for i in range(24)]
  ring = engine_lib.cache_bytes(cfg, 1, 32768)
  full = engine_lib.cache_bytes(cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "layer_types": ()})),
                                1, 32768)
  # 12 full layers x 32768 slots x 2048 B (8 kv heads x 64 x 2 x bf16) against 24 such layers
  assert full == 24 * 32768 * 2048 and ring == 12 * (32768 + 128) * 2048
  print(f"KV cache at 32K tokens, batch 1, bfloat16: {ring / 2**20:.0f} MiB with rings, {full / 2**20:.0f} MiB "
        f"without ({(full - ring) / 2**20:.0f} MiB saved)")


def test_pallas_kernels_match_xla(hf_checkpoint, batch):
  """Training forward and the fresh-cache prefill through the Pallas flash kernel (sinks + sliding window,
  GPU backend in interpret mode) and the Pallas grouped matmul equal the XLA path."""
  path, _ = hf_checkpoint("gpt_oss")
  ids, mask, pixels = batch
  xla = ij.from_pretrained(path)
  pallas = ij.from_pretrained(path, attention_impl="pallas", moe_impl="pallas", pallas_interpret="gpu")
  valid = mask.astype(bool)
  close(np.asarray(ij.forward(pallas, ids, pixels, mask))[valid], np.asarray(ij.forward(xla, ids, pixels, mask))[valid],
        "Pallas vs XLA logits", tol=1e-5)
  rows = [r[m.astype(bool)] for r, m in zip(ids, mask)]
  logits = []
  for model in (xla, pallas):
    eng = engine_lib.Engine(model)
    out, _, _ = eng.prefill(nnx.state(model), rows, pixels, 64)
    logits.append(np.asarray(out)[:2])
  close(logits[1], logits[0], "prefill logits", tol=1e-5)


def test_language_params_equal_transformers_module():
  """The 20B-A4B preset's LLM, counted from our module, against transformers' GptOssForCausalLM (gpt-oss-20b's
  shapes) built on the meta device."""
  from transformers import GptOssConfig, GptOssForCausalLM
  t = zoo.get("InternVL3.5-20B-A4B").text
  c = GptOssConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                   num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                   intermediate_size=t.moe_intermediate_size, num_local_experts=t.num_experts,
                   num_experts_per_tok=t.num_experts_per_tok, sliding_window=t.sliding_window)
  with torch.device("meta"):
    ref = sum(p.numel() for p in GptOssForCausalLM(c).parameters())
  assert zoo.param_counts(zoo.get("InternVL3.5-20B-A4B"))["language_params"] == ref
