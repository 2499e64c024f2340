"""Mixture-of-experts feed-forward (Qwen3-MoE): softmax router, top-k, optional renormalisation of the
top-k weights (`norm_topk_prob`), experts as grouped matmuls over tokens sorted by expert, and the
statistics of the Switch-style load-balancing loss (the same formula as transformers'
`load_balancing_loss_func`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import TextConfig
from internvl_jax.layers import param


def grouped_matmul(lhs, rhs, group_sizes):
  """lhs [tokens, k] sorted by group, rhs [groups, k, n], group_sizes [groups] -> [tokens, n].

  The one entry point for expert matmuls: `jax.lax.ragged_dot` here; the Pallas kernel of `kernels/`
  replaces it behind this signature.
  """
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


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


class MoE(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.cfg = cfg
    self.router = param(rngs, (d, e), ("embed", None), param_dtype)
    self.gate = param(rngs, (e, d, i), ("expert", "embed", "mlp"), param_dtype)
    self.up = param(rngs, (e, d, i), ("expert", "embed", "mlp"), param_dtype)
    self.down = param(rngs, (e, i, d), ("expert", "mlp", "embed"), param_dtype)

  def __call__(self, x, valid):
    """x [b, t, d], valid [b, t] -> (y [b, t, d], balance statistics)."""
    b, t, d = x.shape
    k = self.cfg.num_experts_per_tok
    xf = x.reshape(b * t, d)
    logits = jnp.einsum("td,de->te", xf, self.router[...].astype(x.dtype))
    weights, experts, probs = route(logits, k, self.cfg.norm_topk_prob)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=self.cfg.num_experts)
    xs = xf[token]
    dt = x.dtype
    h = jax.nn.silu(grouped_matmul(xs, self.gate[...].astype(dt), sizes)) * grouped_matmul(
        xs, self.up[...].astype(dt), sizes)
    out = grouped_matmul(h, self.down[...].astype(dt), sizes)
    out = out * weights.reshape(-1)[order][:, None].astype(dt)
    y = jnp.zeros_like(xf).at[token].add(out)
    return y.reshape(b, t, d), balance_stats(probs, experts, valid.reshape(-1))
