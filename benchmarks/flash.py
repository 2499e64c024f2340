"""InternVL3.5-Flash's Visual Resolution Router (ViR) against the same model without routing, in one run.

An InternVL3.5-1B-Flash-shaped model (random weights, `init_model`, float32) gets one image of 1, 6 and 12
tiles (plus the thumbnail when there is more than one tile, as dynamic resolution adds it: 1, 7, 13 tiles)
between --text-tokens prompt tokens. Per image the router's outcome is forced by FlashConfig thresholds to
compress no tile, about half (the tiles above the median p0) or all of them, and each stage is timed
apart: the ViT with `mlp1` (the 256-token features both paths need), the router with `mlp2` (pooling, gating,
the 64-token features and the host's routing decision: what Flash adds), the LLM prefill of the shortened
prompt up to the first token (the generation engine's jitted programs), and decode tokens/s after it. The
baseline runs the same ViT and prefill programs without the router, on the unshortened prompt. Every
program runs once before it is timed (compiling it, and paying its first run: several times a later one
on some machines); times are the best of --repeats. The ViT runs tile by tile, one program for every tile
count (tiles are independent, and one tile's 1025 tokens already make large matmuls). Time to first token
(TTFT) = ViT + router + prefill; each case's prefill time, TTFT and decode speed are printed as ratios
"x no routing".

  python benchmarks/flash.py [--preset InternVL3.5-1B-Flash] [--tiles 1,6,12] [--decode-steps 16]
                             [--text-tokens 64] [--repeats 1]
"""
from __future__ import annotations

import os
import sys

# This folder comes first on sys.path when a script here runs, and benchmarks/kernels.py would shadow the
# kernels package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import internvl_jax as ij
from internvl_jax import zoo
from internvl_jax.inference.engine import Engine, bucket, length_bucket, visual_stats
from internvl_jax.inference.sampling import Sampling, settings_arrays
from internvl_jax.model import vir
from internvl_jax.model.projector import extract_feature

# The routing outcomes, forced through the thresholds (p0 lies in [0, 1]); the parameters stay the same. 'half'
# keeps the released rule, which never compresses the lowest-ranked tile: a one-tile image stays whole.
CASES = {
    "none": dict(absolute_threshold=2.0),
    "half": dict(rule="released", relative_threshold=0.5, absolute_threshold=0.0),
    "all": dict(rule="absolute", absolute_threshold=0.0),
}


def best(fn, repeats, warm=True):
  """Best wall time of fn() over `repeats` runs, after a warm-up run unless its programs already ran, and the
  last result."""
  out = jax.block_until_ready(fn()) if warm else None
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times), out


def prompt(cfg, tiles, text_tokens):
  """<img> tiles x tokens_per_tile <IMG_CONTEXT> </img> inside text_tokens text ids, half before the image."""
  vocab = cfg.text.vocab_size
  text = np.arange(1000, 1000 + text_tokens) % vocab  # ids wrap around the small vocabularies of the test presets
  text[text == cfg.image_token_id] = 1
  before, after = text[:text_tokens // 2], text[text_tokens // 2:]
  image = [151669 % vocab] + [cfg.image_token_id] * (tiles * cfg.tokens_per_tile) + [151670 % vocab]
  return np.concatenate([before, image, after]).astype(np.int32)


def vit_and_mlp1(model, pixels):
  hidden = model.vision_model(pixels)
  return hidden, extract_feature(hidden, model.mlp1, model.cfg.downsample_ratio)


def router_and_mlp2(model, hidden):
  """The 64-token features and p0 [tiles]: what `InternVL.flash_features` adds to the ViT and mlp1."""
  compressed = extract_feature(hidden, model.mlp2, model.cfg.downsample_ratio ** 2)
  return compressed, model.gating(model.pooling_before_gating(hidden[:, 1:]))[:, 0]


def llm(engine, state, row, features, steps, repeats, warm):
  """Prefill of one row up to its first token (best time), then decode tokens/s (median of `steps` steps)."""
  cache_len = bucket(length_bucket(len(row)) + steps + 2, 16)  # as generate sizes it, plus the warm-up step
  settings = settings_arrays([Sampling()], engine.min_batch)
  key = jax.random.key(0)

  def first():
    logits, cache, b = engine.prefill(state, [row], None, cache_len, features=features)
    tokens, seen, _ = engine.first_token(logits, [row], key, settings)
    return tokens, cache, seen, b

  prefill_s, (tokens, cache, seen, b) = best(first, repeats, warm)
  active = jnp.asarray(np.arange(b) < 1)
  # One span for every step (covering the last one), so no step compiles a wider attention program mid-timing.
  longest = len(row) + steps + 1
  tokens, cache, seen, _ = engine.step(state, tokens, cache, seen, active, key, settings, longest)  # warm-up
  jax.block_until_ready(tokens)
  times = []
  for _ in range(steps):  # per step, so the median drops the stalls of a shared machine
    t0 = time.perf_counter()
    tokens, cache, seen, _ = jax.block_until_ready(engine.step(state, tokens, cache, seen, active, key, settings,
                                                                 longest))
    times.append(time.perf_counter() - t0)
  return prefill_s, 1 / float(np.median(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="InternVL3.5-1B-Flash")
  p.add_argument("--tiles", default="1,6,12", help="tiles per image; a thumbnail tile is added when > 1")
  p.add_argument("--decode-steps", type=int, default=16)
  p.add_argument("--text-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=1)
  args = p.parse_args()
  cfg = zoo.get(args.preset).replace(dtype="float32", param_dtype="float32")
  if cfg.flash is None:
    raise SystemExit(f"{args.preset} has no ViR router: pick a -Flash preset")
  model = ij.init_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  engine = Engine(model)
  vit = jax.jit(lambda s, px: vit_and_mlp1(nnx.merge(graphdef, s), px))
  router = jax.jit(lambda s, hidden: router_and_mlp2(nnx.merge(graphdef, s), hidden))
  size, t, c, d = cfg.vision.image_size, cfg.tokens_per_tile, cfg.compressed_tokens_per_tile, cfg.text.hidden_size
  # Warm-ups of the programs every tile count shares: the one-tile ViT and the first token (logits [b, vocab]).
  jax.block_until_ready(vit(state, np.zeros((1, size, size, 3), np.float32)))
  engine.first_token(jnp.zeros((engine.min_batch, cfg.text.vocab_size)), [np.zeros(1, np.int32)], jax.random.key(0),
                     settings_arrays([Sampling()], engine.min_batch))
  print(f"{args.preset} (random weights, float32), {args.text_tokens} text tokens around the image, "
        f"{args.decode_steps} decode steps, best of {args.repeats}, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; a tile is {t} visual tokens, {c} when compressed")
  for n in (int(x) for x in args.tiles.split(",")):
    tiles = n + 1 if n > 1 else n
    pixels = np.random.default_rng(n).standard_normal((tiles, size, size, 3)).astype(np.float32)
    row = prompt(cfg, tiles, args.text_tokens)

    vit_s, out = best(lambda: [vit(state, pixels[i:i + 1]) for i in range(tiles)], args.repeats, warm=False)
    hidden, full = (jnp.concatenate(x) for x in zip(*out))  # not timed: a batched ViT gives them joined

    def features(compressed, squeeze):
      """The shortened row and Engine.prefill's features for it, as Engine.route builds them."""
      ids, index = vir.compress_row(row, squeeze, cfg, first_tile=0, table_tiles=tiles)
      padded = np.zeros(bucket(index.size), np.int32)  # Engine.route pads it too, bounding the prefill programs
      padded[:index.size] = index
      return ids, (full, compressed, jnp.asarray(padded), index.size), visual_stats(tiles, int(squeeze.sum()), t, c)

    def routed(flash):
      compressed, p0 = router(state, hidden)
      return features(compressed, vir.route(np.asarray(p0), flash))

    results, lengths = {}, set()
    for case in ("no routing", *CASES):
      if case == "no routing":  # every tile's 256 features, through the same prefill program (the compressed
        router_s = None  # table there, unused), so only the prompt differs
        ids, feats, stats = features(jnp.zeros((tiles, c, d), full.dtype), np.zeros(tiles, bool))
      else:
        flash = dataclasses.replace(cfg.flash, **CASES[case])
        router_s, (ids, feats, stats) = best(lambda: routed(flash), args.repeats)
      # A prompt length seen before means the same prefill program, already warm.
      results[case] = (router_s, stats, len(ids), *llm(engine, state, ids, feats, args.decode_steps, args.repeats,
                                                       warm=len(ids) not in lengths))
      lengths.add(len(ids))

    print(f"\n{n} tile{'s' * (n > 1)}{' + thumbnail' * (n > 1)} ({tiles} in all)")
    print(f"  {'case':10s} {'compressed':>10s} {'visual tok':>10s} {'prompt':>7s} {'ViT s':>8s} {'router s':>8s} "
          f"{'prefill s':>9s} {'TTFT s':>8s} {'decode tok/s':>12s}")
    ttft = {}
    for case, (router_s, stats, length, prefill_s, tok_s) in results.items():
      ttft[case] = vit_s + (router_s or 0.0) + prefill_s
      squeezed = f"{stats['compressed_tiles']}/{tiles}"
      print(f"  {case:10s} {squeezed:>10s} {stats['visual_tokens_after']:10d} {length:7d} {vit_s:8.3f} "
            f"{'-' if router_s is None else f'{router_s:.3f}':>8s} {prefill_s:9.3f} {ttft[case]:8.3f} {tok_s:12.2f}")
    *_, base_prefill, base_tok = results["no routing"]
    for case in CASES:
      *_, prefill_s, tok_s = results[case]
      print(f"  {case:5s} prefill time {prefill_s / base_prefill:5.2f}x, time to first token "
            f"{ttft[case] / ttft['no routing']:5.2f}x, decode speed {tok_s / base_tok:5.2f}x no routing")


if __name__ == "__main__":
  main()
