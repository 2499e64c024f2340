"""Mixture-of-experts feed-forward (Qwen3-MoE): softmax router, top-k, optional renormalisation of the
top-k weights (`norm_topk_prob`), experts as grouped matmuls over tokens sorted by expert
(`grouped_matmul`: XLA's ragged_dot or the Pallas kernel), and the statistics of the Switch-style
load-balancing loss (the same formula as transformers' `load_balancing_loss_func`).

How the experts meet a Mesh (`moe_per_shard`): with the Pallas grouped matmul the whole routed-expert block
(sort by expert, the three gmm calls, scatter back) runs per token shard, tokens split over the batch axes so
each shard counts its own groups, while the expert weights enter with `P()`: all-gathered whole onto every
shard, each running gmm against all experts ('tensor' shards repeat the same work). With `moe_impl='xla'`
ragged_dot is left to GSPMD. When the mesh's 'expert' axis divides the experts, both implementations run
expert-parallel instead (`moe_expert_parallel`): each expert shard keeps its E/ep experts and the tokens
travel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from internvl_jax.config import KernelConfig, TextConfig
from internvl_jax.model import backend
from internvl_jax.model.layers import dense, param
from internvl_jax.sharding import logical_to_spec


def route(router_logits, top_k: int, norm_topk_prob: bool):
  """-> (top-k weights [T, k] float32, expert ids [T, k], full softmax [T, E] float32)."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts, probs


def balance_stats(probs, experts, valid):
  """Per-layer sums for the load-balancing loss: (top-k assignments per expert [E], router
  probability per expert [E], number of counted tokens). `valid` [T] excludes padding."""
  num_experts = probs.shape[-1]
  w = valid.astype(jnp.float32)
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * w[:, None, None], axis=(0, 1))
  return counts, jnp.sum(probs * w[:, None], axis=0), jnp.sum(w)


def load_balancing_loss(counts, prob_sums, rows):
  """E * sum_e (assignments_e / rows) * (prob_e / rows), with sums over all layers' tokens."""
  num_experts = counts.shape[-1]
  rows = jnp.maximum(rows, 1.0)
  return num_experts * jnp.sum((counts / rows) * (prob_sums / rows))


def sort_by_expert(experts, offset: int, n_local: int):
  """The top-k assignments [T, k] sorted by local expert -> (order [T*k], their tokens [T*k], group sizes
  [n_local], whether each assignment is local [T*k]). Assignments to experts outside offset..offset+n_local-1
  (held by other expert shards) sort after every group, where the grouped matmul leaves zero rows."""
  k = experts.shape[1]
  local = experts.reshape(-1) - offset
  mine = (local >= 0) & (local < n_local)
  local = jnp.where(mine, local, n_local)
  order = jnp.argsort(local, stable=True)
  sizes = jnp.bincount(local, length=n_local).astype(jnp.int32)  # the out-of-range id n_local is not counted
  return order, order // k, sizes, mine


def routed_experts(xf, weights, experts, gate, up, down, *, offset=0, kernels_cfg: KernelConfig = KernelConfig()):
  """SwiGLU experts over tokens sorted by expert: xf [T, d], top-k weights/experts [T, k], expert
  weights [E_local, d, I] / [E_local, I, d] for experts offset..offset+E_local-1 -> [T, d].

  Assignments to other experts (`sort_by_expert`) get weight zero, so they add nothing here. With
  offset 0 and all E experts this is the whole layer. Expert matmuls go through `grouped_matmul`."""
  order, token, sizes, mine = sort_by_expert(experts, offset, gate.shape[0])
  xs = xf[token]
  gmm = lambda lhs, rhs: grouped_matmul(lhs, rhs, sizes, kernels_cfg=kernels_cfg)
  h = jax.nn.silu(gmm(xs, gate)) * gmm(xs, up)
  scale = jnp.where(mine, weights.reshape(-1), 0)[order]
  out = gmm(h, down) * scale[:, None].astype(xf.dtype)
  return jnp.zeros_like(xf).at[token].add(out)


class MoE(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.cfg, self.kernels_cfg = cfg, kernels_cfg
    self.router = param(rngs, (d, e), ("embed", None), param_dtype)
    self.gate = param(rngs, (e, d, i), ("expert", "embed", "mlp"), param_dtype)
    self.up = param(rngs, (e, d, i), ("expert", "embed", "mlp"), param_dtype)
    self.down = param(rngs, (e, i, d), ("expert", "mlp", "embed"), param_dtype)

  @jax.named_scope("moe")
  def __call__(self, x, valid):
    """x [b, t, d], valid [b, t] -> (y [b, t, d], balance statistics)."""
    b, t, d = x.shape
    k = self.cfg.num_experts_per_tok
    xf = x.reshape(b * t, d)
    logits = dense("td,de->te", xf, self.router[...])
    weights, experts, probs = route(logits, k, self.cfg.norm_topk_prob)
    dt = x.dtype
    fn = functools.partial(routed_experts, kernels_cfg=self.kernels_cfg)
    y = moe_per_shard(fn, (xf, weights, experts),
                      (self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt)),
                      kernels_cfg=self.kernels_cfg)
    return y.reshape(b, t, d), balance_stats(probs, experts, valid.reshape(-1))


def grouped_matmul(lhs, rhs, group_sizes, *, kernels_cfg: KernelConfig = KernelConfig()):
  """lhs [tokens, k] sorted by group, rhs [groups, k, n], group_sizes [groups] -> [tokens, n]: XLA's
  ragged_dot or the Pallas grouped matmul."""
  if backend.moe_impl(kernels_cfg) == "xla":
    wide = jnp.float32 if backend.wide_products() else None
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=wide).astype(lhs.dtype)
  return backend.gmm(lhs, rhs, group_sizes.astype(jnp.int32), **backend.kernel_backend(kernels_cfg))


def expert_parallel_size(num_experts: int) -> int:
  """Size of the active mesh's 'expert' axis when the MoE runs expert-parallel on it, else 1. The
  condition is the one under which `sharding.RULES` shards the expert dimension of the weights."""
  mesh = jax.sharding.get_abstract_mesh()
  ep = 1 if mesh.empty else mesh.shape.get("expert", 1)
  return ep if ep > 1 and num_experts % ep == 0 else 1


def moe_per_shard(fn, tokens: tuple, params: tuple, *, kernels_cfg: KernelConfig, param_axes: tuple | None = None):
  """fn(*tokens, *params) -> [tokens, d]: the routed expert computation. Expert-parallel when the mesh's
  'expert' axis shards the experts (`moe_expert_parallel`). Otherwise, with the Pallas grouped matmul it
  runs per token shard (group sizes must be shard-local), the expert weights gathered on every shard, and
  XLA's ragged_dot is left to GSPMD. param_axes: each param's logical axes (default: Qwen3-MoE's gate, up,
  down)."""
  impl = backend.moe_impl(kernels_cfg)
  if expert_parallel_size(params[0].shape[0]) > 1:
    return moe_expert_parallel(fn, *tokens, *params, param_axes=param_axes or QWEN3_EXPERT_AXES)
  if impl == "xla":
    return fn(*tokens, *params)
  mesh = jax.sharding.get_abstract_mesh()
  batch = None if mesh.empty else backend.batch_axes(tokens[0].shape[0], mesh)
  specs = tuple(P(batch, *[None] * (t.ndim - 1)) for t in tokens) + tuple(P() for _ in params)
  return backend.per_shard(fn, (*tokens, *params), specs, P(batch, None))


QWEN3_EXPERT_AXES = (("expert", "embed", "mlp"), ("expert", "embed", "mlp"), ("expert", "mlp", "embed"))


def moe_expert_parallel(fn, xf, weights, experts, *params, param_axes=QWEN3_EXPERT_AXES):
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
  n_local = params[0].shape[0] // mesh.shape["expert"]
  batch = backend.batch_axes(xf.shape[0], mesh)
  split = "expert" in (batch if isinstance(batch, tuple) else (batch,))
  specs = [logical_to_spec(axes, p.shape, mesh) for axes, p in zip(param_axes, params)]
  mlps = {spec[axes.index("mlp")] for axes, spec in zip(param_axes, specs) if "mlp" in axes}
  if len(mlps) != 1:
    raise ValueError(f"the experts' 'mlp' dimensions shard differently ({sorted(map(str, mlps))}): "
                     f"shapes {[p.shape for p in params]}")
  mlp = mlps.pop()
  tok = P(batch, None)
  w_specs = tuple(P("expert", *[mlp if a == "mlp" else None for a in axes[1:]]) for axes in param_axes)

  def body(x, w, e, *params):
    if split:
      x, w, e = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, w, e))
    y = fn(x, w, e, *params, offset=jax.lax.axis_index("expert") * n_local)
    # Scatter first: the psum over 'tensor' then adds T_l rows rather than T_g.
    y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True) if split else jax.lax.psum(y, "expert")
    return y if mlp is None else jax.lax.psum(y, mlp)

  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, *w_specs), out_specs=tok,
                       check_vma=False)(xf, weights, experts, *params)
