"""Which kernel backend a call gets: shared by flash attention and the grouped matmul."""
from __future__ import annotations

import jax


def platform() -> str:
  return {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())


def resolve_backend(backend: str) -> str:
  """'auto' -> this platform's Pallas kernels ('tpu' / 'gpu'), or the XLA 'reference' elsewhere."""
  if backend == "auto":
    return platform() if platform() in ("tpu", "gpu") else "reference"
  if backend not in ("tpu", "gpu", "reference"):
    raise ValueError(f"unknown backend {backend!r} (expected auto, tpu, gpu or reference)")
  return backend


def check_runnable(backend: str, interpret: bool, kernel: str):
  """Pallas kernels compile only for their own platform; interpret mode runs anywhere."""
  if backend in ("tpu", "gpu") and not interpret and platform() != backend:
    raise ValueError(f"the Pallas {backend} {kernel} kernels cannot run on the {platform()} backend; use "
                     "backend='auto' or 'reference', or interpret=True (slow, for tests)")
