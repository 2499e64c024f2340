"""One forward pass of InternVL: `python -m internvl_jax.demos.demo [--checkpoint DIR] [--preset NAME]`.

With --checkpoint (a downloaded release folder, either layout) it loads the weights and, through the
folder's tokenizer, runs `--prompt` about `--image` (tiled as the released models expect) and prints the
most likely next tokens. Without, it builds a randomly initialised preset (default tiny-dense) and runs a
random tile with token ids, then exports the model in both checkpoint layouts, reads each back and checks
that the logits agree.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax.numpy as jnp
import numpy as np

import internvl_jax as ij
from internvl_jax import zoo


def prompt(cfg, n_tiles: int = 1):
  """<img> <IMG_CONTEXT> x (tiles * tokens per tile) </img> + text, as ids; the Qwen3 ids when they fit."""
  img, end = (151669, 151670) if cfg.text.vocab_size > 151670 else (1, 2)
  ids = [3, 4, img] + [cfg.image_token_id] * (n_tiles * cfg.tokens_per_tile) + [end, 5, 6, 7]
  return np.array([ids], np.int32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", help="checkpoint folder (original or transformers layout)")
  parser.add_argument("--preset", default="tiny-dense", help=f"without --checkpoint; one of {', '.join(zoo.PRESETS)}")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--image", help="with --checkpoint: an image file to ask about")
  parser.add_argument("--prompt", default="Describe the image.", help="with --checkpoint: the question")
  args = parser.parse_args(argv)

  t0 = time.perf_counter()
  if args.checkpoint:
    model = ij.from_pretrained(args.checkpoint, dtype=jnp.dtype(args.dtype))
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s")
  else:
    model = ij.init_model(zoo.get(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype), seed=0)
    print(f"initialised {args.preset} (random weights) in {time.perf_counter() - t0:.1f} s")
  cfg = model.cfg
  processor = None
  if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, "tokenizer.json")):
    processor = ij.Processor.from_pretrained(args.checkpoint)
    sample = processor([{"role": "user", "content": args.prompt}], images=[args.image] if args.image else None)
    ids, tile = sample["input_ids"][None], sample["pixel_values"]
    print(f"prompt: {len(sample['input_ids'])} tokens, {0 if tile is None else len(tile)} tiles")
  else:
    ids = prompt(cfg)
    tile = np.random.RandomState(0).randn(1, cfg.vision.image_size, cfg.vision.image_size, 3).astype(np.float32)
  t0 = time.perf_counter()
  logits = np.asarray(ij.forward(model, ids, tile)).astype(np.float32)
  top = np.argsort(-logits[0, -1])[:5].tolist()
  shown = [processor.tokenizer.decode([t], skip_special_tokens=False) for t in top] if processor else top
  print(f"forward (compile + run): {time.perf_counter() - t0:.2f} s; logits {logits.shape}; top-5 next tokens {shown}")
  if not args.checkpoint:
    for layout in ("hf", "original"):
      with tempfile.TemporaryDirectory() as d:
        ij.save_pretrained(model, d, layout=layout)
        again = np.asarray(ij.forward(ij.from_pretrained(d, dtype=jnp.dtype(args.dtype)), ids, tile)).astype(np.float32)
      print(f"{layout:8s} layout: saved, reloaded, max |logit difference| = {np.abs(again - logits).max():.2e}")


if __name__ == "__main__":
  main()
