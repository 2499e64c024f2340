"""MXFP4 expert dequantization against transformers: `convert_moe_packed_tensors` bit for bit, and a real
`Mxfp4Config(dequantize=True)` load of a tiny GPT-OSS checkpoint stored as `_blocks`/`_scales`."""
import json

import ml_dtypes
import numpy as np
import pytest

from internvl_jax.checkpoint import mxfp4

E, D, I = 4, 64, 32  # experts, hidden (multiple of 32), intermediate (multiple of 32)


def _packed(rng, rows, cols, lo=120, hi=135):
  """Random blocks [E, rows, cols/32, 16] and scales [E, rows, cols/32] (realistic exponents lo..hi-1)."""
  blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
  scales = rng.integers(lo, hi, (E, rows, cols // 32), dtype=np.uint8)
  return blocks, scales


def _reference(blocks, scales, torch_dtype):
  torch = pytest.importorskip("torch")
  ref = pytest.importorskip("transformers.integrations.mxfp4")
  assert list(mxfp4.FP4_VALUES) == list(ref.FP4_VALUES)
  return ref.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype)


@pytest.mark.parametrize("proj, rows, cols", [("gate_up_proj", 2 * I, D), ("down_proj", D, I)])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_matches_transformers_float32(proj, rows, cols, chunk):
  import torch
  blocks, scales = _packed(np.random.default_rng(0), rows, cols)
  got = mxfp4.dequantize(blocks, scales, np.float32, rows_per_chunk=chunk)
  want = _reference(blocks, scales, torch.float32).numpy()
  # the module layout: gate_up_proj [E, d, 2I], down_proj [E, I, d]
  assert got.shape == want.shape == (E, cols, rows)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # exact, signed zeros included


def test_matches_transformers_bfloat16():
  import torch
  blocks, scales = _packed(np.random.default_rng(1), 2 * I, D)
  got = mxfp4.dequantize(blocks, scales, ml_dtypes.bfloat16)
  want = _reference(blocks, scales, torch.bfloat16)
  assert got.dtype == ml_dtypes.bfloat16 and got.shape == tuple(want.shape)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_scale_and_nibble(dtype):
  """All 256 exponents (0 -> subnormals, 255 -> 2^128: overflow to inf, as transformers) and every byte value;
  float16 underflows/overflows for most of them, exactly as transformers' float16 path does."""
  import torch
  np_dtype, bits = {"float32": (np.float32, np.uint32), "bfloat16": (ml_dtypes.bfloat16, np.uint16),
                    "float16": (np.float16, np.uint16)}[dtype]
  blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16)[None, None], (1, 256, 16, 16)).copy()
  scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, 16)).copy()
  got = mxfp4.dequantize(blocks, scales, np_dtype)
  want = _reference(blocks, scales, getattr(torch, dtype))
  want = want.view(torch.int32 if bits is np.uint32 else torch.int16).numpy().view(bits)
  assert got.dtype == np_dtype
  np.testing.assert_array_equal(got.view(bits), want)
  # low nibble first: byte 0x21 -> (+0.5, +1.0) at scale 2^0
  one = mxfp4.dequantize(np.full((1, 1, 1, 16), 0x21, np.uint8), np.full((1, 1, 1), 127, np.uint8))
  np.testing.assert_array_equal(one[0, :, 0], np.tile([0.5, 1.0], 16).astype(np.float32))


def test_shape_errors():
  b = np.zeros((E, 8, 2, 16), np.uint8)
  s = np.zeros((E, 8, 2), np.uint8)
  with pytest.raises(ValueError, match=r"\(4, 8, 3\).*\(4, 8, 2, 16\)"):
    mxfp4.dequantize(b, np.zeros((E, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\(4, 8, 2, 15\)"):
    mxfp4.dequantize(np.zeros((E, 8, 2, 15), np.uint8), s)
  with pytest.raises(ValueError, match=r"\(8, 2, 16\)"):
    mxfp4.dequantize(b[0], s[0])
  with pytest.raises(ValueError, match="uint8"):
    mxfp4.dequantize(b.astype(np.int32), s)
  with pytest.raises(ValueError, match="uint8"):
    mxfp4.dequantize(b, s.astype(np.float32))


def test_pairs():
  keys = ["model.embed_tokens.weight", "model.layers.0.mlp.experts.gate_up_proj_blocks",
          "model.layers.0.mlp.experts.gate_up_proj_scales", "model.layers.0.mlp.experts.gate_up_proj_bias",
          "model.layers.0.mlp.experts.down_proj_scales", "model.layers.0.mlp.experts.down_proj_blocks"]
  base = "model.layers.0.mlp.experts."
  assert mxfp4.pairs(keys) == {
      base + "gate_up_proj": (base + "gate_up_proj_blocks", base + "gate_up_proj_scales"),
      base + "down_proj": (base + "down_proj_blocks", base + "down_proj_scales")}
  assert mxfp4.pairs(["a.weight"]) == {}
  with pytest.raises(ValueError, match=r"down_proj_scales.*down_proj_blocks"):
    mxfp4.pairs(keys[:-1])
  with pytest.raises(ValueError, match=r"gate_up_proj_blocks.*gate_up_proj_scales"):
    mxfp4.pairs([k for k in keys if not k.endswith("gate_up_proj_scales")])


def test_transformers_dequantizing_load(tmp_path):
  """A tiny GptOssForCausalLM saved with MXFP4 experts, loaded by transformers with dequantize=True on CPU:
  its expert parameters equal our dequantization bit for bit."""
  import torch
  import transformers
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(2)
  packed = {}
  for layer in range(2):
    for proj, rows, cols in (("gate_up_proj", 2 * I, D), ("down_proj", D, I)):
      packed[f"model.layers.{layer}.mlp.experts.{proj}"] = _packed(rng, rows, cols)
  cfg = transformers.GptOssConfig(num_hidden_layers=2, num_local_experts=E, num_experts_per_tok=2, hidden_size=D,
                                  intermediate_size=I, vocab_size=128, head_dim=16, num_attention_heads=4,
                                  num_key_value_heads=2)
  torch.manual_seed(0)
  ckpt = tmp_path / "ckpt"
  transformers.GptOssForCausalLM(cfg).save_pretrained(ckpt)
  (file,) = sorted(ckpt.glob("*.safetensors"))
  tensors = load_file(file)
  for key, (blocks, scales) in packed.items():
    assert tensors.pop(key).shape == (E, blocks.shape[2] * 32, blocks.shape[1])  # the module's layout
    tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
  assert set(mxfp4.pairs(tensors)) == set(packed)
  save_file(tensors, str(file), metadata={"format": "pt"})
  config = json.loads((ckpt / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "mxfp4"}
  (ckpt / "config.json").write_text(json.dumps(config))
  model = transformers.GptOssForCausalLM.from_pretrained(
      ckpt, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32, device_map="cpu")
  loaded = {k: v.detach().numpy() for k, v in model.named_parameters() if k in packed}
  assert set(loaded) == set(packed)
  for key, (blocks, scales) in packed.items():
    got = mxfp4.dequantize(blocks, scales, np.float32)
    assert got.shape == loaded[key].shape and loaded[key].dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), loaded[key].view(np.uint32))
