"""ViCO step costs against the SFT step, measured in one run on the same packed batch and random weights: the
reference forward alone (what precomputing its log-probs would take off the consistency step), the
consistency step (reference forward + policy forward and backward), and the router step (reference forward,
1 + R LLM variants per row, router backward). Default shape: the ViCO demo's model (56 px tiles of 16 tokens,
ViT 2 x 64, LLM 2 x 128, vocab 384), 8 packed rows of 256 tokens with 2 images of 4 tiles each, 12 tile slots.

  python benchmarks/vico.py [--rows 8] [--length 256] [--images 2] [--slots 12] [--steps 5]
"""
from __future__ import annotations

import os
import sys

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from internvl_jax import sharding, zoo
from internvl_jax.model.internvl import init_model
from internvl_jax.training import optim, sft, vico

VISION = dict(image_size=56, patch_size=7, hidden_size=64, num_heads=4, intermediate_size=256, num_layers=2)
TEXT = dict(vocab_size=384, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
            intermediate_size=384)


def demo_config():
  c = zoo.get("tiny-flash")
  return c.replace(vision=dataclasses.replace(c.vision, **VISION), text=dataclasses.replace(c.text, **TEXT),
                   image_token_id=300)


def make_batch(cfg, rows, length, images, tiles, slots, seed=0):
  """Rows of `images` samples, each 4 text tokens, one image of `tiles` tiles, then text up to the row's share,
  the last quarter of each sample labelled."""
  rng = np.random.default_rng(seed)
  t, size = cfg.tokens_per_tile, cfg.vision.image_size
  b = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "segment_ids", "position_ids")}
  b["labels"] = np.full((rows, length), -100, np.int32)
  b["loss_weights"] = np.zeros((rows, length), np.float32)
  b["pixel_values"] = rng.standard_normal((rows, slots, size, size, 3)).astype(np.float32)
  share = length // images
  for r in range(rows):
    for s in range(images):
      ids = np.concatenate([rng.integers(1, 299, 4), np.full(t * tiles, cfg.image_token_id),
                            rng.integers(1, 299, share - 4 - t * tiles)])
      sl = slice(s * share, (s + 1) * share)
      b["input_ids"][r, sl], b["segment_ids"][r, sl], b["position_ids"][r, sl] = ids, s + 1, np.arange(share)
      b["labels"][r, sl][-share // 4:] = ids[-share // 4:]
      b["loss_weights"][r, sl][-share // 4:] = 1.0
  b.update(vico.tile_layout(b["input_ids"], b["segment_ids"], cfg.image_token_id, t, slots))
  return b


def timed(fn, args, steps):
  """(compile + first call seconds, median seconds of the next `steps` calls); fn returns a fresh first arg."""
  t0 = time.perf_counter()
  args = fn(*args)
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    args = fn(*args)
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--images", type=int, default=2, help="samples (one image each) per row")
  parser.add_argument("--tiles", type=int, default=4, help="tiles per image")
  parser.add_argument("--slots", type=int, default=12, help="tile slots per row (data.max_tiles_per_row)")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  cfg = demo_config()
  mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  batch = make_batch(cfg, args.rows, args.length, args.images, args.tiles, args.slots)
  rg, rp, rr = nnx.split(init_model(cfg.replace(flash=None), seed=1, mesh=mesh), nnx.Param, ...)
  g, p, rest = nnx.split(init_model(cfg, seed=2, mesh=mesh), nnx.Param, ...)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-4, warmup=0, weight_decay=0.0, b1=0.9, b2=0.95,
                                                           eps=1e-8, clip_norm=1.0)), 100)[0]
  batch_sh = sft.batch_sharding(mesh, batch)
  placed = jax.device_put(batch, batch_sh)
  ref_sh = sharding.state_shardings(rp, mesh)

  def state_for(trainable):
    train, frozen = optim.split_trainable(jax.tree.map(jnp.copy, p), trainable, flash=True)
    state = sft.TrainState(step=jnp.zeros((), jnp.int32), params=train, frozen=frozen, opt_state=tx.init(train),
                           key=jax.random.key_data(jax.random.key(0)))
    state_sh = sft.state_shardings(jax.eval_shape(lambda s: s, state), mesh, tx)
    return jax.device_put(state, state_sh), state_sh

  rows = {}
  full = ("vision_model", "mlp1", "mlp2", "language_model")
  state, state_sh = state_for(("vision_model", "mlp1", "language_model"))
  step = sft.make_train_step(g, rest, tx, sft.StepConfig(), mesh, state_sh,
                             {k: batch_sh[k] for k in sft.BATCH_KEYS})
  plain = {k: placed[k] for k in sft.BATCH_KEYS}
  rows["SFT step (reference point)"] = timed(lambda s: (jax.block_until_ready(step(s, plain)[0]),), (state,),
                                            args.steps)
  ref_fwd = sft.under_mesh(jax.jit(lambda params, b: vico._reference_out(rg, params, rr, b)[0]), mesh)
  rows["reference forward alone"] = timed(lambda x: (ref_fwd(rp, placed).block_until_ready(),), (None,), args.steps)
  state, state_sh = state_for(full)
  step = vico.make_step("vico_consistency", g, rest, rg, rr, tx, mesh, state_sh, ref_sh, batch_sh,
                        vico.ConsistencyConfig())
  rows["consistency step (eq. 7)"] = timed(lambda s: (jax.block_until_ready(step(s, rp, placed)[0]),), (state,),
                                           args.steps)
  state, state_sh = state_for(vico.ROUTER_PARTS)
  step = vico.make_step("vico_router", g, rest, rg, rr, tx, mesh, state_sh, ref_sh, batch_sh, vico.RouterConfig())
  window = jax.device_put(vico.window_init(4096), jax.NamedSharding(mesh, jax.P()))
  rows[f"router step (eq. 8-9, {1 + args.slots} variants)"] = timed(
      lambda s, w: jax.block_until_ready(step(s, w, rp, placed)[:2]), (state, window), args.steps)
  base = rows["SFT step (reference point)"][1]
  print(f"{args.rows} rows x {args.length} tokens, {args.images} images x {args.tiles} tiles per row, {args.slots} "
        f"tile slots; median of {args.steps} steps after the first; {jax.devices()[0].platform}")
  print(f"{'program':<36}{'first call s':>14}{'ms per step':>13}{'x SFT step':>12}")
  for name, (first, median) in rows.items():
    print(f"{name:<36}{first:>14.2f}{1000 * median:>13.1f}{median / base:>12.2f}")
  share = rows["reference forward alone"][1] / rows["consistency step (eq. 7)"][1]
  print(f"the reference forward is {100 * share:.0f}% of the consistency step: precomputing its log-probs would "
        f"save at most that")


if __name__ == "__main__":
  main()
