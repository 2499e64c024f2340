"""Inference speed against transformers (PyTorch, CPU) on an InternVL3.5-1B-shaped model, random weights.

Measured in one run, same shapes for both:
* the engine: prefill latency for 1 tile + 120 text tokens (376 tokens, the next-token logits only, as
  generate's first step), and decode tokens/s at batch 1 and 8 (after a prefill of 128 text tokens per
  row) of the bare decode step (`Engine.step` dispatched in a loop, no host work between steps);
* the public `generate` (`--generate_steps`, default 64): batch 1 with that 1-tile prompt and batch 8 with
  text prompts of 32 tokens, against transformers' `generate` on the same inputs. Time to first token =
  `max_new_tokens=1`; decode rate = the extra tokens over the difference in wall time. Beside it, at the
  same shapes: the bare `Engine.step` loop (generate's rate as a fraction of it) and the alternative to
  generate's device-side chunks, single steps with double-buffered dispatch (step i+1 is dispatched before
  step i's tokens are read on the host).
Ours runs the generation engine's jitted programs (compile time not counted); transformers runs its model
forward / generate.

  python benchmarks/inference.py [--dtypes float32,bfloat16] [--steps 16] [--generate_steps 64]
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
from flax import nnx

import internvl_jax as ij
from internvl_jax import zoo
from internvl_jax.checkpoint import pretrained as checkpoint
from internvl_jax.inference.engine import Engine, bucket, decode_carry, generate, length_bucket
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
  engine, state = Engine(model), jax.tree.map(lambda x: x, nnx.state(model))
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
    tokens, cache, seen, _ = engine.step(state, tokens, cache, seen, active, key, settings, 128)  # compile
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for i in range(steps):
      tokens, cache, seen, _ = engine.step(state, tokens, cache, seen, active, key, settings, 129 + i)
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


def engine_rates(model, rows, pixels, new):
  """tokens/s of the bare `Engine.step` loop and of single-step double-buffered `Engine.decode` dispatch,
  `new` steps after a prefill of `rows`, with the cache length `generate` would pick."""
  engine, state = Engine(model), nnx.state(model)
  cache_len = bucket(length_bucket(max(len(r) for r in rows)) + new + 1, 16)
  longest = max(len(r) for r in rows)
  rates = {}
  # each loop runs twice and the second is timed: the first compiles every span bucket the steps cross
  for mode in ("step", "double-buffered") * 2:
    logits, cache, b = engine.prefill(state, rows, pixels, cache_len)
    settings = settings_arrays([Sampling()] * len(rows), b)
    seen, active = jnp.zeros((b, model.cfg.text.vocab_size), bool), jnp.arange(b) < len(rows)
    tokens, key = jnp.argmax(logits, -1).astype(jnp.int32), jax.random.key(0)
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    if mode == "step":
      for i in range(new):
        tokens, cache, seen, _ = engine.step(state, tokens, cache, seen, active, key, settings, longest + i)
      jax.block_until_ready(tokens)
    else:
      carry = decode_carry(tokens, cache, seen, active, np.ones(b, np.int32), key=key)
      limit, eos, pending = np.full(b, new + 2, np.int32), np.zeros(0, np.int32), None
      for i in range(new):
        carry, drawn, _ = engine.decode(state, carry, settings, limit, eos, longest + i, steps=1)
        if pending is not None:
          np.asarray(pending)  # the host reads step i-1 while step i runs
        pending = drawn
      np.asarray(pending)
    rates[mode] = new * len(rows) / (time.perf_counter() - t0)
  return rates


def public(cfg, dtype, prompt, pixels, new, chunk):
  """generate against transformers' generate: (first-token s, decode tok/s) each, at b1 (1 tile) and b8."""
  model = ij.init_model(cfg, seed=0)
  text = (np.arange(32)[None] * 7 + np.arange(8)[:, None] * 13 + 20) % min(cfg.text.vocab_size, cfg.image_token_id)
  cases = {"b1, 1 tile": (np.asarray(prompt)[None], pixels), "b8, text": (text.astype(np.int32), None)}
  hf = hf_model(cfg, dtype)
  out = {}
  for name, (ids, px) in cases.items():
    run = lambda n: generate(model, ids, px, max_new_tokens=n, eos_token_ids=(), chunk_size=chunk)
    run(1), run(new + 1)  # compile
    first = timed(lambda: run(1), reps=2)
    total = timed(lambda: run(new + 1))
    rates = engine_rates(model, list(ids), px, new)
    t_ids = torch.tensor(ids.astype(np.int64))
    t_px = None if px is None else torch.tensor(px).permute(0, 3, 1, 2).to(dtype)
    with torch.no_grad():
      images = {} if t_px is None else {"pixel_values": t_px}
      hf_run = lambda n: hf.generate(input_ids=t_ids, **images, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0)
      t_first = timed(lambda: hf_run(1), reps=2)
      t_total = timed(lambda: hf_run(new + 1))
    b = len(ids)
    out[name] = {"first": first, "rate": new * b / (total - first), "hf_first": t_first,
                 "hf_rate": new * b / max(t_total - t_first, 1e-9), **rates}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="InternVL3.5-1B")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--generate_steps", type=int, default=64, help="new tokens timed in the public-generate part")
  p.add_argument("--chunk", type=int, default=8, help="generate's chunk_size (decode steps per dispatch)")
  p.add_argument("--parts", default="engine,generate")
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
    if "engine" in args.parts:
      compile_s, prefill, decode = ours(cfg, prompt, pixels, args.steps, batches)
      t_prefill, t_decode = theirs(cfg, getattr(torch, name), prompt, pixels, args.steps, batches)
      print(f"\n{name}: the engine (our compile of the prefill program {compile_s:.1f} s, not counted)")
      print(f"  prefill      ours {prefill:7.2f} s   transformers {t_prefill:7.2f} s   time ratio "
            f"{prefill / t_prefill:.2f}x")
      for b in batches:
        print(f"  decode b={b:<3d} ours {decode[b]:7.2f} tok/s   transformers {t_decode[b]:7.2f} tok/s   "
              f"speed ratio {decode[b] / t_decode[b]:.2f}x")
    if "generate" in args.parts:
      res = public(cfg, getattr(torch, name), prompt, pixels, args.generate_steps, args.chunk)
      print(f"\n{name}, public generate ({args.generate_steps} new tokens after the first, chunk {args.chunk}):")
      for case, r in res.items():
        print(f"  {case:11s} first token ours {r['first']:6.2f} s  transformers {r['hf_first']:6.2f} s  "
              f"({r['first'] / r['hf_first']:.2f}x the time)")
        print(f"  {'':11s} decode ours {r['rate']:7.2f} tok/s  transformers {r['hf_rate']:7.2f} tok/s  "
              f"({r['rate'] / r['hf_rate']:.2f}x); bare Engine.step {r['step']:7.2f} tok/s (generate "
              f"{r['rate'] / r['step']:.1%} of it); double-buffered single steps {r['double-buffered']:7.2f} "
              f"tok/s ({r['double-buffered'] / r['step']:.1%})")


if __name__ == "__main__":
  main()
