"""Where the model meets the hardware: which implementation runs attention and the MoE grouped matmul, how a
kernel meets a Mesh, and the forms that only XLA:CPU needs. The model files call `attention.attention` and
`moe`'s experts and stay backend-free; every platform test lives here.

Kernel choice (`KernelConfig`, from `InternVLConfig.kernels`): 'auto' picks the Pallas kernels on TPU and GPU
and XLA elsewhere; 'xla' and 'pallas' force one; 'cudnn' (attention only) calls
`jax.nn.dot_product_attention`'s cuDNN path. Asking for a kernel the platform cannot run is an error, except
with `interpret` ('tpu' or 'gpu'), which runs that backend's kernels in interpret mode anywhere.

The CPU forms, each measured (WORKSPACE.md, Inference):
  - `wide_products`: bfloat16 products ask for a float32 result (XLA:CPU's only AVX512-BF16 form);
  - `headwise_pays`: attention one (row, kv head) at a time, its logits staying in cache;
  - `kv_storage`: the KV cache holds 16-bit floats as uint16 bits, so cache writes stay in place;
  - `min_batch`: bfloat16 generation runs at least two rows (one row takes a matrix-vector path ~8x slower).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from internvl_jax.config import KernelConfig
from internvl_jax.sharding import logical_to_spec

try:  # our top-level `kernels/` (the design fixes its name; Hugging Face's `kernels` distribution shares it)
  from kernels import flash_attention, gmm
  from kernels.platform import platform
except ImportError as e:
  import kernels
  raise ImportError(f"`import kernels` found {getattr(kernels, '__file__', kernels)}, not internvl-jax's kernels "
                    "package: another installed distribution provides a top-level `kernels` (e.g. Hugging Face's "
                    "kernels); uninstall it or install internvl-jax in its own environment") from e

__all__ = ["KernelConfig", "attention_impl", "batch_axes", "flash_attention", "from_storage", "gmm", "headwise_pays",
           "heads_axis", "kernel_backend", "kv_storage", "min_batch", "moe_impl", "per_shard", "platform", "resolve",
           "to_storage", "wide_products"]


def resolve(impl: str, interpret: str | None, *, allowed: tuple[str, ...]) -> str:
  if impl not in allowed:
    raise ValueError(f"unknown implementation {impl!r}; expected one of {allowed}")
  if impl == "auto":
    return "pallas" if interpret or platform() in ("tpu", "gpu") else "xla"
  if impl == "cudnn" and platform() != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs a GPU; this is {platform()}")
  if impl == "pallas" and not interpret and platform() not in ("tpu", "gpu"):
    raise ValueError(f"Pallas kernels need a TPU or GPU (this is {platform()}); use 'xla', 'auto', or "
                     "pallas_interpret='tpu'|'gpu' for interpret mode")
  return impl


def attention_impl(kernels: KernelConfig) -> str:
  return resolve(kernels.attention, kernels.interpret, allowed=("auto", "xla", "pallas", "cudnn"))


def moe_impl(kernels: KernelConfig) -> str:
  return resolve(kernels.moe, kernels.interpret, allowed=("auto", "xla", "pallas"))


def kernel_backend(kernels: KernelConfig) -> dict:
  """Keyword arguments of a `kernels` call: the platform's own kernel, or the interpreted one."""
  return dict(backend=kernels.interpret or "auto", interpret=kernels.interpret is not None)


def batch_axes(n: int, mesh):
  return logical_to_spec(("batch",), (n,), mesh)[0]


def per_shard(fn, args, specs, out_spec):
  """fn(*args) directly, or through shard_map over the active mesh with the given PartitionSpecs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def heads_axis(n_heads: int, n_kv_heads: int):
  """'tensor' when the active mesh has one that divides both head counts, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  t = 1 if mesh.empty else mesh.shape.get("tensor", 1)
  return "tensor" if t > 1 and n_heads % t == 0 and n_kv_heads % t == 0 else None


# ------------------------------------------------------------------------------------------ the CPU forms

def wide_products() -> bool:
  """Whether products ask for a float32 result and cast it back: on the CPU, where that is the only form in
  which XLA runs a bfloat16 product on AVX512-BF16 instructions (twice its float32 rate; asked for a bfloat16
  result it converts and runs at the float32 rate). Accelerators accumulate in float32 inside the product
  anyway, and there the product's output keeps the activation dtype, so a remat policy that saves dot
  outputs saves them at that width."""
  return jax.default_backend() == "cpu"


def headwise_pays() -> bool:
  """Head-wise attention on the CPU without a mesh (~4x faster for InternViT's 1,025 tokens: 29 vs 122 ms per
  layer); under a mesh the batched form lets GSPMD shard heads; accelerators run the flash kernels."""
  return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def kv_storage(dtype):
  """The KV cache's element type for a compute dtype: 16-bit floats are stored as their uint16 bit patterns.
  XLA:CPU runs a bfloat16 scatter or dynamic_update_slice in float32, converting the whole cache there and
  back on every decode step (~40 ms per layer at batch 8); on uint16 the write stays in place."""
  return jnp.dtype(jnp.uint16) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def to_storage(x, storage):
  """Values in the compute dtype -> the cache's element type (`kv_storage`)."""
  return jax.lax.bitcast_convert_type(x, storage) if storage == jnp.uint16 else x.astype(storage)


def from_storage(x, dtype):
  """Cache elements -> values in the compute dtype `dtype`."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x.astype(dtype)


def min_batch(compute_dtype) -> int:
  """Rows a prefill or decode runs at least: two for bfloat16 under `wide_products` (one bfloat16 row runs
  on a matrix-vector path ~8x slower than two rows, which run on AVX512-BF16; the spare row is inactive)."""
  return 2 if wide_products() and jnp.dtype(compute_dtype) == jnp.bfloat16 else 1
