"""Peak host memory of `from_pretrained` against the checkpoint size and against each process's share.

Writes a random-weight checkpoint of a preset (default InternVL3.5-1B, bfloat16, ~2 GB) with our safetensors
writer (kept and reused while its config matches), then loads it in fresh processes and reports peak resident
memory above the baseline before loading (VmHWM, reset first: Linux's ru_maxrss reads the same counter, so
the reset keeps import peaks out of both) and the bytes read (/proc/self/io rchar). On the CPU the loaded arrays live in host memory, so a process's loader cost is
peak - baseline - its share (the bytes of its own shards, a copy per device).

  python benchmarks/load_memory.py [--preset InternVL3.5-1B] [--dir /tmp/ivl_ckpt] [--layout hf]
  python benchmarks/load_memory.py --processes 2 --mesh fsdp=8    # 2 processes x 4 CPU devices, gloo
  python benchmarks/load_memory.py --processes 2 --code /tmp/old  # the loader of another checkout

With --processes N the workers join with jax.distributed on 127.0.0.1 and load onto one global mesh
(--mesh, default fsdp over all devices); --devices sets the simulated CPU devices per process.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This folder comes first on sys.path when a script here runs (benchmarks/kernels.py would shadow the kernels
# package), and the package must come from this checkout (or --code), not from wherever it is installed.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
_code = [a.split("=", 1)[1] if "=" in a else b for a, b in zip(sys.argv, sys.argv[1:] + [""])
         if a == "--code" or a.startswith("--code=")]
sys.path.insert(0, os.path.abspath(_code[-1] if _code else ROOT))

import argparse
import json
import socket
import subprocess
import time

import numpy as np


def write_random_checkpoint(preset: str, folder: str, layout: str):
  """Writes the checkpoint unless `folder` already holds one of this config; returns (total, largest) bytes."""
  import ml_dtypes
  from internvl_jax import zoo
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.checkpoint import safetensors_io
  from internvl_jax.checkpoint.keys import specs
  cfg = zoo.get(preset)
  rng = np.random.default_rng(0)
  entries = []
  for spec in specs(cfg, layout).values():
    for key, shape in zip(spec.keys, spec.shapes):
      make = lambda shape=shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
      entries.append((key, shape, np.dtype(ml_dtypes.bfloat16), make))
  largest = max(int(np.prod(s)) for _, s, _, _ in entries) * 2
  total = sum(int(np.prod(s)) for _, s, _, _ in entries) * 2
  config = json.loads(json.dumps(checkpoint.config_to_dict(cfg, layout)))
  try:
    with open(os.path.join(folder, "config.json")) as f:
      same = json.load(f) == config
    have = safetensors_io.Checkpoint(folder)
    if same and {k: have.shape(k) for k in have.keys()} == {e[0]: tuple(e[1]) for e in entries}:
      return total, largest
  except (OSError, ValueError):
    pass
  os.makedirs(folder, exist_ok=True)
  safetensors_io.write(folder, entries)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  return total, largest


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _reset_peak():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS


def _track_placements(jax) -> dict:
  """Both loaders (this one and the one before lazy reads) place every parameter through
  jax.make_array_from_callback: after each, VmHWM is the peak of that parameter's window (its reads
  included), so its excess over the shards placed so far is the loader's own transient memory. VmHWM
  (and with it ru_maxrss) is reset per window, so the overall peak is the largest window peak."""
  seen = dict(placed=0, excess=0, peak=0)
  place = jax.make_array_from_callback

  def tracked(*args, **kwargs):
    out = place(*args, **kwargs)
    peak = _status("VmHWM")
    seen["placed"] += sum(s.data.nbytes for s in out.addressable_shards)
    seen["peak"] = max(seen["peak"], peak)
    seen["excess"] = max(seen["excess"], peak - seen["placed"])
    _reset_peak()
    return out

  jax.make_array_from_callback = tracked
  return seen


def measure(args):
  """Runs in a fresh process: resident memory before, peak during the load (Linux VmHWM, reset first)."""
  import jax
  if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)
  import jax.numpy as jnp
  from flax import nnx
  import internvl_jax as ij
  from internvl_jax import sharding
  axes = {k: int(v) for k, v in (a.split("=") for a in args.mesh.split(","))} if args.mesh else None
  mesh = sharding.make_mesh(axes) if axes else None
  jnp.zeros(1).block_until_ready()
  seen = _track_placements(jax) if mesh is not None else dict(excess=0, peak=0)
  base, rchar = _status("VmRSS"), _rchar()
  _reset_peak()  # imports peak higher than their resident cost
  t0 = time.perf_counter()
  model = ij.from_pretrained(args.dir, dtype=jnp.bfloat16, mesh=mesh)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  peak, read = max(_status("VmHWM"), seen["peak"]), _rchar() - rchar
  share = sum(s.data.nbytes for x in params for s in x.addressable_shards)
  print(json.dumps(dict(process=jax.process_index(), baseline=base, peak=peak, share=share,
                        transient=seen["excess"] - base if mesh is not None else None, read=read,
                        seconds=seconds, package=os.path.dirname(ij.__file__))))
  if args.processes > 1:
    jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(args) -> list[dict]:
  cmd = [sys.executable, os.path.abspath(__file__), "--measure", "--dir", args.dir, f"--code={args.code}",
         "--processes", str(args.processes), "--mesh", args.mesh]
  if args.processes == 1:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [json.loads(out.stdout.strip().splitlines()[-1])]
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
  procs = [subprocess.Popen(cmd + ["--port", str(port), "--process-id", str(i)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(args.processes)]
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise SystemExit(f"worker failed:\n{err[-3000:]}")
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="InternVL3.5-1B")
  parser.add_argument("--dir", default="/tmp/internvl_jax_load_memory")
  parser.add_argument("--layout", default="hf", choices=["hf", "original"])
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process (--processes > 1)")
  parser.add_argument("--mesh", default=None, help="e.g. fsdp=8 or fsdp=4,tensor=2 (default: none for one "
                                                   "process, fsdp over all devices for several)")
  parser.add_argument("--code", default=ROOT, help="checkout whose internvl_jax is measured")
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    return measure(args)
  if args.mesh is None:
    args.mesh = f"fsdp={args.processes * args.devices}" if args.processes > 1 else ""
  total, largest = write_random_checkpoint(args.preset, args.dir, args.layout)
  results = run_workers(args)
  gb = lambda x: f"{x / 2**30:.2f} GiB"
  print(f"{args.preset} ({args.layout} layout, bfloat16): checkpoint {gb(total)}, largest tensor {gb(largest)}; "
        f"{args.processes} process(es), mesh {args.mesh or 'none'}; package {results[0]['package']}")
  for r in results:
    above = r["peak"] - r["baseline"]
    overhead = above - r["share"]
    print(f"process {r['process']}: load {r['seconds']:.1f} s; share {gb(r['share'])}; peak RSS {gb(r['peak'])} = "
          f"baseline {gb(r['baseline'])} + {gb(above)} (share + loader overhead {gb(overhead)}); read {gb(r['read'])}")
    print(f"  above baseline / checkpoint = {above / total:.2f}, / share = {above / r['share']:.2f}; "
          f"overhead / largest tensor = {overhead / largest:.2f}; read / checkpoint = {r['read'] / total:.2f}")
    if r["transient"] is not None:
      print(f"  largest transient (resident beyond the shards placed so far, any moment of the load): "
            f"{gb(r['transient'])} = {r['transient'] / largest:.2f} x largest tensor")


if __name__ == "__main__":
  main()
