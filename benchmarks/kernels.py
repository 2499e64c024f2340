"""Kernels against their alternatives, on whatever backend is present.

Attention (causal, bf16 on accelerators): XLA reference, our Pallas kernel, and cuDNN through
`jax.nn.dot_product_attention` on GPU; grouped matmul: `jax.lax.ragged_dot` vs our Pallas gmm on the
Qwen3-30B-A3B expert shapes (128 experts, hidden 2048, expert width 768, top-8). Forward and
forward+backward; prints milliseconds, ratio to XLA (and, for attention, to cuDNN: n/a without a GPU) and
achieved TFLOP/s against this device's measured matmul peak. On the CPU only the XLA paths run, at small
sizes, so CI exercises the script.

  python benchmarks/kernels.py [--seq 4096] [--batch 1] [--heads 32] [--kv-heads 8] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Run as a script, this file's folder comes first on sys.path and its name would shadow the package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402


def bench(fn, *args, reps: int = 5) -> float:
  """Median seconds of a jitted call (after one compile-and-warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  return 2 * n ** 3 / bench(jax.jit(lambda a: a @ a), a)


def table(label, times, flops, peak, cudnn=False):
  """One row per implementation; the first is the XLA baseline. `cudnn` adds the ratio to cuDNN's time
  (the attention goal is stated against it), n/a where cuDNN did not run."""
  print(f" {label}")
  base, ref = next(iter(times.values())), times.get(CUDNN)
  for name, seconds in times.items():
    vs_cudnn = "" if not cudnn else f"{ref / seconds:6.2f}x cuDNN  " if ref else "   n/a x cuDNN  "
    print(f"  {name:36s} {seconds * 1e3:9.2f} ms  {base / seconds:6.2f}x XLA  {vs_cudnn}"
          f"{flops / seconds / 1e12:7.2f} TFLOP/s ({flops / seconds / peak:5.1%} of peak)")


CUDNN = "cuDNN (jax.nn.dot_product_attention)"


def main():
  platform = jax.default_backend()
  on_accel = platform in ("gpu", "tpu", "cuda")
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, default=4096 if on_accel else 256)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=32 if on_accel else 4)
  p.add_argument("--kv-heads", type=int, default=8 if on_accel else 2)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--tokens", type=int, default=8192 if on_accel else 64)
  # Qwen3-30B-A3B expert shapes; the CPU defaults are small because XLA:CPU's ragged_dot is very slow there.
  p.add_argument("--experts", type=int, default=128 if on_accel else 8)
  p.add_argument("--hidden", type=int, default=2048 if on_accel else 256)
  p.add_argument("--width", type=int, default=768 if on_accel else 128)
  p.add_argument("--top-k", type=int, default=8)
  args = p.parse_args()
  dtype = jnp.bfloat16 if on_accel else jnp.float32
  peak = matmul_peak(dtype, 8192 if on_accel else 1024)
  print(f"device: {jax.devices()[0].device_kind} ({platform}); {jnp.dtype(dtype).name}; "
        f"measured matmul peak {peak / 1e12:.2f} TFLOP/s")

  b, t, n, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, t, n, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, t, kv, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, t, kv, d)), dtype)
  fwd_flops = 4 * b * n * t * t * d / 2  # causal: half the score matrix
  impls = {"XLA (reference)": lambda q, k, v: kernels.reference_attention(q, k, v, causal=True)}
  if on_accel:
    impls["Pallas flash attention"] = lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)
  if platform in ("gpu", "cuda"):
    impls[CUDNN] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
  print(f"\nattention: batch {b}, seq {t}, heads {n}/{kv}, head_dim {d}, causal")
  for label, flops, make in (("forward", fwd_flops, lambda f: jax.jit(f)),
                             ("forward+backward", 3.5 * fwd_flops,
                              lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                                         (0, 1, 2))))):
    table(label, {name: bench(make(f), q, k, v) for name, f in impls.items()}, flops, peak, cudnn=True)

  experts, hidden, width, top_k = args.experts, args.hidden, args.width, args.top_k
  m = args.tokens * top_k
  sizes = np.bincount(rng.integers(0, experts, m), minlength=experts).astype(np.int32)
  lhs = jnp.asarray(rng.standard_normal((m, hidden)), dtype)
  rhs = jnp.asarray(rng.standard_normal((experts, hidden, width)) * 0.02, dtype)
  gs = jnp.asarray(sizes)
  impls = {"ragged_dot (XLA)": lambda l, r: jax.lax.ragged_dot(l, r, gs)}
  if on_accel:
    impls["Pallas gmm"] = lambda l, r: kernels.gmm(l, r, gs)
  print(f"\ngrouped matmul: {args.tokens} tokens x top-{top_k} = {m} rows, {experts} experts, {hidden} -> {width}")
  for label, flops, make in (("forward", 2 * m * hidden * width, jax.jit),
                             ("forward+backward", 6 * m * hidden * width,
                              lambda f: jax.jit(jax.grad(lambda l, r: jnp.sum(f(l, r).astype(jnp.float32)), (0, 1))))):
    table(label, {name: bench(make(f), lhs, rhs) for name, f in impls.items()}, flops, peak)


if __name__ == "__main__":
  main()
