"""Which implementation runs attention and the MoE grouped matmul, and how kernels meet a Mesh.

`attention_impl` / `moe_impl` (InternVLConfig): 'auto' picks the Pallas kernels on TPU and GPU and XLA on
the CPU; 'xla' and 'pallas' force one; 'cudnn' (attention only) calls `jax.nn.dot_product_attention`'s cuDNN
path. Asking for a kernel the platform cannot run is an error, except with `pallas_interpret` ('tpu' or
'gpu'), which runs that backend's kernels in interpret mode anywhere. Under a Mesh (`jax.set_mesh`) the
Pallas kernels run per shard through `shard_map`. Attention: batch over the batch axes, heads over 'tensor'
when both query and kv heads divide it. MoE (`moe_per_shard`): the whole routed-expert block (sort by expert,
the three gmm calls, scatter back) runs per token shard, tokens split over the batch axes so each shard
counts its own groups, while the expert weights enter with `P()`: all-gathered whole onto every shard, each
running gmm against all experts ('tensor' shards repeat the same work). With `moe_impl='xla'` ragged_dot is
left to GSPMD.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internvl_jax.sharding import logical_to_spec
from kernels.platform import platform


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


def _batch_axes(n: int, mesh):
  return logical_to_spec(("batch",), (n,), mesh)[0]


def per_shard(fn, args, specs, out_spec):
  """fn(*args) directly, or through shard_map over the active mesh with the given PartitionSpecs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def attention(q, k, v, *, causal: bool, segment_ids=None, impl: str = "auto", interpret: str | None = None):
  """q [b, t, n, h], k/v [b, s, kv, h]; segment_ids [b, t] (t == s) or None; causal or bidirectional."""
  from internvl_jax.layers import xla_attention
  impl = resolve(impl, interpret, allowed=("auto", "xla", "pallas", "cudnn"))
  if impl == "xla":
    return xla_attention(q, k, v, causal=causal, segment_ids=segment_ids)
  if impl == "cudnn":
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  import kernels
  fn = functools.partial(kernels.flash_attention, causal=causal, backend=interpret or "auto",
                         interpret=interpret is not None)
  mesh = jax.sharding.get_abstract_mesh()
  b, _, n, _ = q.shape
  batch = None if mesh.empty else _batch_axes(b, mesh)
  heads = None
  if not mesh.empty and "tensor" in mesh.shape and mesh.shape["tensor"] > 1:
    heads = "tensor" if n % mesh.shape["tensor"] == 0 and k.shape[2] % mesh.shape["tensor"] == 0 else None
  spec = P(batch, None, heads, None)
  if segment_ids is None:
    return per_shard(lambda q, k, v: fn(q, k, v), (q, k, v), (spec, spec, spec), spec)
  return per_shard(lambda q, k, v, s: fn(q, k, v, segment_ids=s), (q, k, v, segment_ids),
                   (spec, spec, spec, P(batch, None)), spec)


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto", interpret: str | None = None):
  """lhs [tokens, k] sorted by group, rhs [groups, k, n], group_sizes [groups] -> [tokens, n]."""
  impl = resolve(impl, interpret, allowed=("auto", "xla", "pallas"))
  if impl == "xla":
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
  import kernels
  return kernels.gmm(lhs, rhs, group_sizes.astype(jnp.int32), backend=interpret or "auto",
                     interpret=interpret is not None)


def moe_per_shard(fn, tokens: tuple, params: tuple, *, impl: str, interpret: str | None):
  """fn(*tokens, *params) -> [tokens, d]: the routed expert computation. With the Pallas grouped matmul it
  runs per token shard (group sizes must be shard-local), the expert weights gathered on every shard;
  XLA's ragged_dot is left to GSPMD. (Expert parallelism with all-to-all is the scale-out issue.)"""
  if resolve(impl, interpret, allowed=("auto", "xla", "pallas")) == "xla":
    return fn(*tokens, *params)
  mesh = jax.sharding.get_abstract_mesh()
  batch = None if mesh.empty else _batch_axes(tokens[0].shape[0], mesh)
  specs = tuple(P(batch, *[None] * (t.ndim - 1)) for t in tokens) + tuple(P() for _ in params)
  return per_shard(fn, (*tokens, *params), specs, P(batch, None))
