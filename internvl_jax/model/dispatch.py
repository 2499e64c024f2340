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
left to GSPMD. When the mesh's 'expert' axis divides the experts, both implementations run expert-parallel
instead (`moe_expert_parallel`): each expert shard keeps its E/ep experts and the tokens travel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internvl_jax.model import layers
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
  from internvl_jax.model.layers import xla_attention
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
    wide = jnp.float32 if layers.wide_products() else None
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=wide).astype(lhs.dtype)
  import kernels
  return kernels.gmm(lhs, rhs, group_sizes.astype(jnp.int32), backend=interpret or "auto",
                     interpret=interpret is not None)


def expert_parallel_size(num_experts: int) -> int:
  """Size of the active mesh's 'expert' axis when the MoE runs expert-parallel on it, else 1. The
  condition is the one under which `sharding.RULES` shards the expert dimension of the weights."""
  mesh = jax.sharding.get_abstract_mesh()
  ep = 1 if mesh.empty else mesh.shape.get("expert", 1)
  return ep if ep > 1 and num_experts % ep == 0 else 1


def moe_per_shard(fn, tokens: tuple, params: tuple, *, impl: str, interpret: str | None):
  """fn(*tokens, *params) -> [tokens, d]: the routed expert computation. Expert-parallel when the mesh's
  'expert' axis shards the experts (`moe_expert_parallel`). Otherwise, with the Pallas grouped matmul it
  runs per token shard (group sizes must be shard-local), the expert weights gathered on every shard, and
  XLA's ragged_dot is left to GSPMD."""
  impl = resolve(impl, interpret, allowed=("auto", "xla", "pallas"))
  if expert_parallel_size(params[0].shape[0]) > 1:
    return moe_expert_parallel(fn, *tokens, *params)
  if impl == "xla":
    return fn(*tokens, *params)
  mesh = jax.sharding.get_abstract_mesh()
  batch = None if mesh.empty else _batch_axes(tokens[0].shape[0], mesh)
  specs = tuple(P(batch, *[None] * (t.ndim - 1)) for t in tokens) + tuple(P() for _ in params)
  return per_shard(fn, (*tokens, *params), specs, P(batch, None))


def moe_expert_parallel(fn, xf, weights, experts, gate, up, down):
  """Expert parallelism: each shard of the 'expert' axis (size ep) holds E/ep experts and computes only
  their contributions, for every token of its expert group (the ep shards that share data/fsdp indices).

  Tokens xf [T, d] with their top-k weights/experts [T, k] are split over the batch axes (data, fsdp,
  expert). Inside `shard_map`: all-gather the group's tokens and routing over 'expert' (T_g = ep * T_l
  rows), run `fn` (the routed experts, offset to this shard's first expert: grouped matmuls with the local
  group sizes, other experts' rows left zero), then `psum_scatter` over 'expert' hands each token owner the
  sum of the k contributions. The 'mlp' dimension of the weights stays as RULES shard it ('tensor'): each
  tensor shard computes a slice of the SwiGLU hidden units, an exact split, and a psum over 'tensor' adds
  the partial down projections. 'embed' enters gathered (GSPMD's all-gather, as FSDP). The router, top-k
  and load-balancing statistics stay outside, on the global tokens, so they are unchanged.

  Communication per layer and shard, forward (the backward pass runs the transposes, the same volume):
  all-gather receives (ep - 1) * T_l * d activations (+ the small [T_l, k] routing), psum_scatter sends
  (ep - 1) * T_l * d. The alternative, a fixed-capacity all_to_all, must size each destination's buffer
  for the worst case to drop nothing (all T_l * k assignments of a shard going to one destination), so it
  moves (ep - 1) * T_l * k * d each way: k times more. A ragged all-to-all (no padding; TPU/GPU) moves
  about T_l * k * (ep - 1) / ep * d when the load is balanced: fewer bytes than this once ep > k (the
  Qwen3-MoE models have k = 8), at the price of data-dependent buffer sizes. Compute is the same for all:
  each shard multiplies ~T_l * k rows on average, in a static buffer of T_g * k rows (the exact worst case).

  When T does not split over 'expert' (e.g. a short decode batch) the tokens are already whole on every
  expert shard: no gather, and a psum over 'expert' sums the contributions.
  """
  mesh = jax.sharding.get_abstract_mesh()
  n_local = gate.shape[0] // mesh.shape["expert"]
  batch = _batch_axes(xf.shape[0], mesh)
  split = "expert" in (batch if isinstance(batch, tuple) else (batch,))
  mlp = logical_to_spec(("expert", "embed", "mlp"), gate.shape, mesh)[2]
  tok, in_w, out_w = P(batch, None), P("expert", None, mlp), P("expert", mlp, None)

  def body(x, w, e, gate, up, down):
    if split:
      x, w, e = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, w, e))
    y = fn(x, w, e, gate, up, down, offset=jax.lax.axis_index("expert") * n_local)
    # Scatter first: the psum over 'tensor' then adds T_l rows rather than T_g.
    y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True) if split else jax.lax.psum(y, "expert")
    return y if mlp is None else jax.lax.psum(y, mlp)

  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, in_w, in_w, out_w), out_specs=tok,
                       check_vma=False)(xf, weights, experts, gate, up, down)
