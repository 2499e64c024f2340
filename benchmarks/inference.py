"""Inference speed against transformers (PyTorch, CPU) on an InternVL3.5-1B-shaped model, random weights.

Measured in one run, same shapes for both: prefill latency for 1 tile + 120 text tokens (376 tokens, the
next-token logits only, as generate's first step), and decode tokens/s at batch 1 and 8 (after a prefill of
128 text tokens per row), in float32 and bfloat16. Ours runs the generation engine's jitted programs
(compile time printed separately, not counted); transformers runs its model forward / generate.

  python benchmarks/inference.py [--dtypes float32,bfloat16] [--steps 16] [--preset InternVL3.5-1B]
"""
from __future__ import annotations

import os
import sys

# This folder comes first on sys.path when a script here runs, and benchmarks/kernels.py would shadow the
# kernels package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import internvl_jax as ij
from internvl_jax import zoo
from internvl_jax.checkpoint import pretrained as checkpoint
from internvl_jax.inference.engine import Engine
from internvl_jax.inference.sampling import Sampling, settings_arrays


def hf_model(cfg, dtype):
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  c = checkpoint.config_to_dict(cfg, "hf")
  c.pop("architectures"), c.pop("model_type")
  model = InternVLForConditionalGeneration(InternVLConfig(**c)).eval()
  return model.to(dtype)


def timed(fn, reps=1):
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def ours(cfg, prompt, pixels, steps, batches):
  model = ij.init_model(cfg, seed=0)
  engine, state = Engine(model), jax.tree.map(lambda x: x, __import__("flax").nnx.state(model))
  cache_len = 512
  t0 = time.perf_counter()
  logits, _, _ = engine.prefill(state, [prompt], pixels, cache_len)
  jax.block_until_ready(logits)
  compile_s = time.perf_counter() - t0
  prefill = timed(lambda: jax.block_until_ready(engine.prefill(state, [prompt], pixels, cache_len)[0]), reps=2)
  decode = {}
  for b in batches:
    rows = [np.arange(10, 138, dtype=np.int32) % cfg.text.vocab_size] * b
    logits, cache, bb = engine.prefill(state, rows, None, cache_len)
    settings = settings_arrays([Sampling()] * b, bb)
    seen = jnp.zeros((bb, cfg.text.vocab_size), bool)
    active, key = jnp.ones((bb,), bool), jax.random.key(0)
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens, cache, seen, _ = engine.decode(state, tokens, cache, seen, active, key, settings, 128)  # compile
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for i in range(steps):
      tokens, cache, seen, _ = engine.decode(state, tokens, cache, seen, active, key, settings, 129 + i)
    jax.block_until_ready(tokens)
    decode[b] = steps * b / (time.perf_counter() - t0)
  return compile_s, prefill, decode


def theirs(cfg, dtype, prompt, pixels, steps, batches):
  model = hf_model(cfg, dtype)
  ids = torch.tensor(np.asarray(prompt)[None].astype(np.int64))
  px = torch.tensor(pixels).permute(0, 3, 1, 2).to(dtype)
  with torch.no_grad():
    prefill = timed(lambda: model(input_ids=ids, pixel_values=px, logits_to_keep=1), reps=2)
    decode = {}
    for b in batches:
      rows = (torch.arange(10, 138) % cfg.text.vocab_size).repeat(b, 1)
      t_prefill = timed(lambda: model(input_ids=rows, logits_to_keep=1))
      total = timed(lambda: model.generate(input_ids=rows, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                           do_sample=False, pad_token_id=0))
      decode[b] = steps * b / max(total - t_prefill, 1e-9)
  return prefill, decode


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="InternVL3.5-1B")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--batches", default="1,8")
  args = p.parse_args()
  torch.manual_seed(0)
  batches = [int(b) for b in args.batches.split(",")]
  base = zoo.get(args.preset)
  vocab, size = base.text.vocab_size, base.vision.image_size
  text = np.arange(1000, 1118) % vocab  # token ids wrap around the small vocabularies of the test presets
  text[text == base.image_token_id] = 1
  prompt = np.concatenate([[151669 % vocab], [base.image_token_id] * base.tokens_per_tile, [151670 % vocab],
                           text]).astype(np.int32)  # 1 tile + 120 text tokens
  pixels = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  print(f"{args.preset}, prompt {len(prompt)} tokens (1 tile + 120 text), {torch.get_num_threads()} torch threads, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  for name in args.dtypes.split(","):
    cfg = base.replace(dtype=name, param_dtype=name)
    compile_s, prefill, decode = ours(cfg, prompt, pixels, args.steps, batches)
    t_prefill, t_decode = theirs(cfg, getattr(torch, name), prompt, pixels, args.steps, batches)
    print(f"\n{name}: (our compile of the prefill program {compile_s:.1f} s, not counted)")
    print(f"  prefill      ours {prefill:7.2f} s   transformers {t_prefill:7.2f} s   time ratio {prefill / t_prefill:.2f}x")
    for b in batches:
      print(f"  decode b={b:<3d} ours {decode[b]:7.2f} tok/s   transformers {t_decode[b]:7.2f} tok/s   "
            f"speed ratio {decode[b] / t_decode[b]:.2f}x")


if __name__ == "__main__":
  main()
