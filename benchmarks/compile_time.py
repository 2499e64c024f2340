"""Compile time of the jitted forward pass against decoder depth (layers are a Python loop, not a scan).

Lowers and compiles `forward` for an InternVL3.5-1B-shaped model at several depths from abstract shapes
(nothing allocated) and prints seconds per depth, so the cost of unrolled layers is a measured number.

  python benchmarks/compile_time.py [--preset InternVL3.5-1B] [--depths 7,14,28] [--seq 256]
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
from flax import nnx

import internvl_jax as ij
from internvl_jax import zoo


def compile_seconds(cfg, seq: int) -> float:
  abstract = nnx.eval_shape(lambda: ij.InternVL(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  pixels = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)

  def fwd(state, ids, pixels):
    return nnx.merge(graphdef, state)(ids, pixels)

  t0 = time.perf_counter()
  jax.jit(fwd).lower(state, ids, pixels).compile()
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="InternVL3.5-1B")
  parser.add_argument("--depths", default="7,14,28")
  parser.add_argument("--seq", type=int, default=384)
  args = parser.parse_args()
  base = zoo.get(args.preset)
  for depth in map(int, args.depths.split(",")):
    cfg = base.replace(text=dataclasses.replace(base.text, num_layers=depth))
    print(f"{args.preset} with {depth:3d} decoder layers (+ {base.vision.num_layers} ViT layers): "
          f"compile {compile_seconds(cfg, args.seq):.1f} s")


if __name__ == "__main__":
  main()
