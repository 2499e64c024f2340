"""Mixture-of-experts feed-forward (Qwen3-MoE): softmax router, top-k, optional renormalisation of the
top-k weights (`norm_topk_prob`), experts as grouped matmuls over tokens sorted by expert
(`dispatch.grouped_matmul`: ragged_dot or the Pallas kernel; expert-parallel under a Mesh with an 'expert'
axis, see `dispatch.moe_expert_parallel`), and the
statistics of the Switch-style load-balancing loss (the same formula as transformers'
`load_balancing_loss_func`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.model import dispatch
from internvl_jax.config import TextConfig
from internvl_jax.model.layers import dense, param


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


def routed_experts(xf, weights, experts, gate, up, down, *, offset=0, impl: str = "auto",
                   interpret: str | None = None):
  """SwiGLU experts over tokens sorted by expert: xf [T, d], top-k weights/experts [T, k], expert
  weights [E_local, d, I] / [E_local, I, d] for experts offset..offset+E_local-1 -> [T, d].

  Assignments to experts outside that range (held by other expert shards) sort after every group, where
  the grouped matmul leaves zero rows, and their weight is zeroed, so they add nothing here. With
  offset 0 and all E experts this is the whole layer. Expert matmuls go through
  `dispatch.grouped_matmul`."""
  k, n_local = experts.shape[1], gate.shape[0]
  local = experts.reshape(-1) - offset
  mine = (local >= 0) & (local < n_local)
  local = jnp.where(mine, local, n_local)
  order = jnp.argsort(local, stable=True)
  token = order // k
  sizes = jnp.bincount(local, length=n_local).astype(jnp.int32)  # the out-of-range id n_local is not counted
  xs = xf[token]
  gmm = lambda lhs, rhs: dispatch.grouped_matmul(lhs, rhs, sizes, impl=impl, interpret=interpret)
  h = jax.nn.silu(gmm(xs, gate)) * gmm(xs, up)
  scale = jnp.where(mine, weights.reshape(-1), 0)[order]
  out = gmm(h, down) * scale[:, None].astype(xf.dtype)
  return jnp.zeros_like(xf).at[token].add(out)


class MoE(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, impl: str = "auto", interpret: str | None = None,
               rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.cfg, self.impl, self.interpret = cfg, impl, interpret
    self.router = param(rngs, (d, e), ("embed", None), param_dtype)
    self.gate = param(rngs, (e, d, i), ("expert", "embed", "mlp"), param_dtype)
    self.up = param(rngs, (e, d, i), ("expert", "embed", "mlp"), param_dtype)
    self.down = param(rngs, (e, i, d), ("expert", "mlp", "embed"), param_dtype)

  def __call__(self, x, valid):
    """x [b, t, d], valid [b, t] -> (y [b, t, d], balance statistics)."""
    b, t, d = x.shape
    k = self.cfg.num_experts_per_tok
    xf = x.reshape(b * t, d)
    logits = dense("td,de->te", xf, self.router[...])
    weights, experts, probs = route(logits, k, self.cfg.norm_topk_prob)
    dt = x.dtype
    fn = functools.partial(routed_experts, impl=self.impl, interpret=self.interpret)
    y = dispatch.moe_per_shard(fn, (xf, weights, experts),
                               (self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt)),
                               impl=self.impl, interpret=self.interpret)
    return y.reshape(b, t, d), balance_stats(probs, experts, valid.reshape(-1))
