"""Peak host memory of `from_pretrained` against the checkpoint size (streaming loader check).

Writes a random-weight checkpoint of a preset (default InternVL3.5-1B, bfloat16, ~2.1 GB) with our
safetensors writer, then loads it in a fresh process and reports peak resident memory. On the CPU the
loaded model itself lives in host memory, so the loader's own cost is peak - baseline - model bytes,
to be compared with the largest single tensor (what a streaming loader must hold at once).

  python benchmarks/load_memory.py [--preset InternVL3.5-1B] [--dir /tmp/ivl_ckpt] [--layout hf]
"""
from __future__ import annotations

import os
import sys

# This folder comes first on sys.path when a script here runs, and benchmarks/kernels.py would shadow the
# kernels package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import subprocess
import time

import numpy as np


def write_random_checkpoint(preset: str, folder: str, layout: str):
  import ml_dtypes
  from internvl_jax import checkpoint, safetensors_io, zoo
  from internvl_jax.checkpoint_keys import specs
  cfg = zoo.get(preset)
  rng = np.random.default_rng(0)
  entries = []
  for spec in specs(cfg, layout).values():
    for key, shape in zip(spec.keys, spec.shapes):
      make = lambda shape=shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
      entries.append((key, shape, np.dtype(ml_dtypes.bfloat16), make))
  os.makedirs(folder, exist_ok=True)
  safetensors_io.write(folder, entries)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(checkpoint.config_to_dict(cfg, layout), f)
  largest = max(int(np.prod(s)) for _, s, _, _ in entries) * 2
  total = sum(int(np.prod(s)) for _, s, _, _ in entries) * 2
  return total, largest


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(folder: str):
  """Runs in a fresh process: resident memory before, peak during the load (Linux VmHWM, reset first)."""
  import jax
  import jax.numpy as jnp
  import internvl_jax as ij
  jnp.zeros(1).block_until_ready()
  base = _status("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM: imports peak higher than their resident cost
  t0 = time.perf_counter()
  model = ij.from_pretrained(folder, dtype=jnp.bfloat16)
  jax.block_until_ready(jax.tree.leaves(model))
  seconds = time.perf_counter() - t0
  peak = _status("VmHWM")
  from flax import nnx
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(json.dumps(dict(baseline=base, peak=peak, model_bytes=model_bytes, seconds=seconds)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="InternVL3.5-1B")
  parser.add_argument("--dir", default="/tmp/internvl_jax_load_memory")
  parser.add_argument("--layout", default="hf", choices=["hf", "original"])
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    return measure(args.dir)
  total, largest = write_random_checkpoint(args.preset, args.dir, args.layout)
  out = subprocess.run([sys.executable, __file__, "--measure", "--dir", args.dir], check=True,
                       capture_output=True, text=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  gb = lambda x: f"{x / 2**30:.2f} GiB"
  overhead = r["peak"] - r["baseline"] - r["model_bytes"]
  print(f"{args.preset} ({args.layout} layout, bfloat16): checkpoint {gb(total)}, largest tensor {gb(largest)}")
  print(f"load time {r['seconds']:.1f} s; peak RSS {gb(r['peak'])} = baseline {gb(r['baseline'])} + model "
        f"{gb(r['model_bytes'])} + loader overhead {gb(overhead)}")
  print(f"loader overhead / checkpoint = {overhead / total:.2f}; overhead / largest tensor = {overhead / largest:.2f}")


if __name__ == "__main__":
  main()
