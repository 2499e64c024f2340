"""Test setup: 8 simulated CPU devices (set before JAX starts) and tiny transformers reference models.

The reference models are built once per session with random weights (every tensor perturbed, norms and
layer scales included, so a mis-mapped key cannot hide) and saved as safetensors in a temp folder.
"""
import os
import socket
import subprocess
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers >= 5.25 kernelizes every from_pretrained through Hugging Face's `kernels` package, whose import
# name our top-level `kernels/` takes (README: the test command uninstalls it); without it, hub kernels are off.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

IMAGE_TOKEN = 500
VOCAB = 512

VISION = dict(model_type="internvl_vision", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, image_size=[56, 56], patch_size=[14, 14], norm_type="layer_norm",
              use_qk_norm=False, attention_bias=True, layer_scale_init_value=0.1)
TEXT = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0, tie_word_embeddings=False)
VARIANTS = {
    # dense Qwen3, InternViT-300M style, untied lm_head
    "dense": dict(vision=VISION, text=TEXT, tie=False),
    # Qwen3-MoE, tied lm_head
    "moe": dict(vision=VISION, text={**TEXT, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True}, tie=True),
    # InternViT-6B style: RMSNorm, QK-norm over the full width, no qkv bias
    "vit6b": dict(vision={**VISION, "norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False},
                  text=TEXT, tie=False),
    # GPT-OSS (InternVL3.5-20B-A4B style): 4 layers alternating sliding (window 8) / full, sinks, YaRN (the
    # gpt-oss-20b rope parameters), biased router and clamped SwiGLU experts
    "gpt_oss": dict(vision=VISION, tie=False, text=dict(
        model_type="gpt_oss", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, router_aux_loss_coef=0.9, tie_word_embeddings=False)),
}


def build_hf(variant: str, seed: int = 0, **overrides):
  """A tiny transformers InternVLForConditionalGeneration with every weight randomised."""
  import torch
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  v = VARIANTS[variant]
  cfg = InternVLConfig(vision_config=dict(v["vision"]), text_config=dict(v["text"]), image_token_id=IMAGE_TOKEN,
                       downsample_ratio=0.5, tie_word_embeddings=v["tie"], **overrides)
  torch.manual_seed(seed)
  model = InternVLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "layernorm_before.weight", "layernorm_after.weight", "layer_norm.weight")):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "lambda" in name:
        p.copy_(0.5 + 0.2 * torch.randn_like(p))
      elif "language_model" in name and name.endswith("bias"):  # GPT-OSS: biases that 0.1 would let dominate
        p.copy_(0.02 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1))
  return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
  """variant -> (folder of a saved transformers checkpoint, the torch model)."""
  cache = {}

  def get(variant: str):
    if variant not in cache:
      model = build_hf(variant)
      path = str(tmp_path_factory.mktemp(f"hf_{variant}"))
      model.save_pretrained(path)
      cache[variant] = (path, model)
    return cache[variant]

  return get


def make_batch(seed: int = 0, tokens_per_tile: int = 4, tiles=(2, 1), image_size: int = 56):
  """Two rows: row 0 holds two images (tiles[0] + 1 tiles), row 1 one image (tiles[1] tiles) and is
  left-padded. Returns input_ids, attention_mask, pixel_values (NHWC)."""
  rng = np.random.RandomState(seed)

  def image(n):
    return [IMAGE_TOKEN] * (n * tokens_per_tile)

  text = lambda n: list(rng.randint(0, IMAGE_TOKEN, n))
  row0 = text(3) + image(tiles[0]) + text(2) + image(1) + text(4)
  row1 = text(2) + image(tiles[1]) + text(3)
  width = max(len(row0), len(row1))
  ids = np.zeros((2, width), np.int64)
  mask = np.zeros((2, width), np.int64)
  ids[0, :len(row0)], mask[0, :len(row0)] = row0, 1
  ids[1, width - len(row1):], mask[1, width - len(row1):] = row1, 1
  n_tiles = tiles[0] + 1 + tiles[1]
  pixels = rng.randn(n_tiles, image_size, image_size, 3).astype(np.float32)
  return ids, mask, pixels


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<img>", "</img>", "<IMG_CONTEXT>",
           "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def bpe_tokenizer(texts, special, trained: int):
  """A byte-level BPE tokenizer (tokenizers) trained on texts (x20) up to 400 ids: special[:trained] are ids
  of the training, the rest added after it as special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(list(texts) * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=list(special[:trained]),
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(list(special[trained:]))
  return tok


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
  """A folder with a tokenizer.json built here (byte-level BPE + InternVL's special tokens) and the config
  of the tiny-dense preset with that tokenizer's <IMG_CONTEXT> id (no weights)."""
  import json
  from internvl_jax import zoo
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.inputs.conversation import INTERNVL_SYSTEM
  tok = bpe_tokenizer(["What is in the image? A red panda is eating bamboo.", "Describe the video frame by frame.",
                       "The answer is 42. Frame1: Image-1: user assistant system", INTERNVL_SYSTEM], SPECIAL, 3)
  folder = tmp_path_factory.mktemp("ckpt")
  tok.save(str(folder / "tokenizer.json"))
  cfg = zoo.get("tiny-dense").replace(image_token_id=tok.token_to_id("<IMG_CONTEXT>"))
  with open(folder / "config.json", "w") as f:
    json.dump(checkpoint.config_to_dict(cfg, "original"), f)
  return folder




def digits_setup(data_root: str):
  """configs/digits.py pointed at a digits build -> (config, model config, Processor), made as train.py makes
  them (trainer.model_config, trainer.make_processor)."""
  import sys
  from internvl_jax.training import loop as trainer
  from internvl_jax.inputs.tokenizer import Tokenizer
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from configs import digits as digits_config
  cfg = digits_config.get_config()
  cfg.data_root = data_root
  tokenizer = Tokenizer.from_pretrained(data_root)
  model_cfg = trainer.model_config(cfg, tokenizer)
  return cfg, model_cfg, trainer.make_processor(cfg, model_cfg, tokenizer)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A small digits demo build (120 sum pairs for training, 16 held out; every scan): shared, read-only."""
  from internvl_jax.demos import digits
  out = tmp_path_factory.mktemp("digits")
  digits.build(str(out), train_pairs=120, eval_pairs=16)
  return str(out)


PORT_TAKEN = "Failed to add port to server"  # what a jax.distributed coordinator prints when its bind fails


def run_coordinated(jobs, timeout: float, attempts: int = 3):
  """Processes that meet at a jax.distributed coordinator: `jobs(port) -> [(argv, env), ...]`, process 0 the
  coordinator. -> [(returncode, stdout, stderr)]. A probed port can be taken before the coordinator binds it,
  so a launch whose bind failed is retried on a fresh port; once any process fails, the others (which would
  wait for it until their own timeout) are killed."""
  for _ in range(attempts):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
      procs, files = [], []
      for i, (argv, env) in enumerate(jobs(port)):
        files.append((open(os.path.join(tmp, f"{i}.out"), "w+"), open(os.path.join(tmp, f"{i}.err"), "w+")))
        procs.append(subprocess.Popen(argv, env=env, stdout=files[-1][0], stderr=files[-1][1], text=True))
      deadline = time.monotonic() + timeout
      try:
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
          assert time.monotonic() < deadline, f"processes still running after {timeout} s"
          time.sleep(0.1)
      finally:
        for p in procs:
          if p.poll() is None:
            p.kill()
          p.wait()
      results = []
      for p, (out, err) in zip(procs, files):
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    if not any(PORT_TAKEN in err for _, _, err in results):
      return results
  raise AssertionError(f"the coordinator's port was taken by another program {attempts} times in a row")


@pytest.fixture(scope="session")
def coordinated():
  """`run_coordinated` (see there), as a fixture for the multi-process tests."""
  return run_coordinated
