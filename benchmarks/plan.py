"""How long the memory planner takes: seconds per `plan.plan` call for the paper's sizes on a pod-slice mesh
(the official recipe: 512 rows x 32768 tokens, loss_chunk 2048). The first call per model builds its abstract
parameters (`nnx.eval_shape`, cached); later calls are shape arithmetic only.

  python benchmarks/plan.py [--models InternVL3.5-8B,InternVL3.5-241B-A28B] [--mesh fsdp:64,expert:8]
"""
from __future__ import annotations

import os
import sys

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import time

from internvl_jax import zoo
from internvl_jax.training import plan

PAPER = [n for n in zoo.PRESETS if n.startswith("InternVL3.5-")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(PAPER))
  p.add_argument("--mesh", default="fsdp:64,expert:8")
  args = p.parse_args(argv)
  mesh = plan.parse_mesh(args.mesh)
  print(f"plan.plan on {plan.mesh_str(mesh)}, 512 x 32768 tokens; seconds")
  print(f"{'model':<24} {'first call':>10} {'again':>8}  verdict")
  for name in args.models.split(","):
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      out = plan.plan(name, mesh, batch=512, seq=32768, device_memory=95 * 2 ** 30, loss_chunk=2048)
      times.append(time.perf_counter() - t0)
    print(f"{name:<24} {times[0]:>10.2f} {times[1]:>8.3f}  {out['verdict']}")


if __name__ == "__main__":
  main()
