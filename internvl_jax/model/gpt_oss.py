"""GPT-OSS, the decoder of InternVL3.5-20B-A4B (REFERENCE.md §9), numerically transformers' `GptOssForCausalLM`.

What differs from Qwen3 (`qwen3.py`, whose decoder skeleton, cache handling and load-balancing loss it reuses):
* attention: q/k/v/o biases, no q/k norm, YaRN RoPE (`layers.rope_frequencies`), a learned sink logit per
  head (exp(sink) joins the softmax denominator with no value), and layers alternating between a sliding
  window (`TextConfig.layer_types`; keys fewer than `sliding_window` positions behind the query) and full
  attention. Generation keeps a ring of `sliding_window` slots for the sliding layers
  (`attention.ring_attention`) and the full cache for the others;
* RMSNorm multiplies by its weight in float32 before the cast back;
* MoE: a biased router, top-k on the logits and a softmax over the chosen k; experts with one interleaved
  gate/up projection (gate = even columns, up = odd), both biased, gate clamped <= limit, up to
  [-limit, limit], out = (up + 1) * gate * sigmoid(alpha * gate), then down + bias.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import KernelConfig, TextConfig
from internvl_jax.model import attention
from internvl_jax.model.layers import RMSNorm, dense, param, rope
from internvl_jax.model.moe import (balance_stats, expert_parallel_size, grouped_matmul, moe_per_shard,
                                    sort_by_expert)
from internvl_jax.model.qwen3 import AttentionOut, LayerOut, Qwen3Decoder, project_in, project_out
from internvl_jax.sharding import constrain


class GptOssAttention(nnx.Module):

  def __init__(self, cfg: TextConfig, window: int | None, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(),
               rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg, self.window, self.kernels_cfg = cfg, window, kernels_cfg
    self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    if cfg.attention_bias:
      self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), param_dtype, "zeros")
      self.k_bias = param(rngs, (kv, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
      self.v_bias = param(rngs, (kv, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
      self.o_bias = param(rngs, (d,), ("embed",), param_dtype, "zeros")
    self.sinks = param(rngs, (n,), ("heads",), param_dtype, "zeros")

  def _in(self, x, name):
    y = project_in(x, getattr(self, f"{name}_proj"))
    return y + getattr(self, f"{name}_bias")[...].astype(y.dtype) if self.cfg.attention_bias else y

  @jax.named_scope("attention")
  def __call__(self, x, positions, segment_ids, kv=None, cache=None) -> AttentionOut:
    """As `qwen3.Attention`; a sliding layer's cache kv is its ring (`attention.cached_attention`)."""
    t = self.cfg
    q = rope(self._in(x, "q"), positions, t.rope_theta, t.rope_scaling)
    k = rope(self._in(x, "k"), positions, t.rope_theta, t.rope_scaling)
    v = self._in(x, "v")
    sinks = self.sinks[...].astype(jnp.float32)
    if cache is None:
      out = attention.attention(q, k, v, causal=True, segment_ids=segment_ids, sliding_window=self.window,
                                sinks=sinks, kernels_cfg=self.kernels_cfg)
    else:
      out, kv = attention.cached_attention(q, k, v, kv, cache, window=self.window, sinks=sinks,
                                           kernels_cfg=self.kernels_cfg)
    out = project_out(out, self.o_proj)
    if t.attention_bias:
      out = out + self.o_bias[...].astype(out.dtype)
    return AttentionOut(out, kv)


def route(router_logits, top_k: int):
  """GPT-OSS routing: top-k on the logits, softmax over the chosen k -> (weights [T, k] float32, expert ids
  [T, k], full softmax [T, E] float32 for the load-balancing loss, whose top-k are the same experts)."""
  logits = router_logits.astype(jnp.float32)
  top, experts = jax.lax.top_k(logits, top_k)
  return jax.nn.softmax(top, axis=-1), experts, jax.nn.softmax(logits, axis=-1)


def clamped_swiglu(gate_up, alpha: float, limit: float):
  """[..., 2I] interleaved (gate, up) pairs -> [..., I]: (up + 1) * gate * sigmoid(alpha * gate), with gate
  clamped <= limit and up to [-limit, limit]."""
  gate = jnp.minimum(gate_up[..., ::2], limit)
  up = jnp.clip(gate_up[..., 1::2], -limit, limit)
  return (up + 1) * gate * jax.nn.sigmoid(gate * alpha)


def routed_experts(xf, weights, experts, gate_up, gate_up_bias, down, *, offset=0, alpha: float, limit: float,
                   kernels_cfg: KernelConfig = KernelConfig()):
  """`moe.routed_experts` for GPT-OSS's experts: gate_up [E_local, d, 2I] with its bias [E_local, 2I], down
  [E_local, I, d]. The down projection's bias is added outside (`GptOssExperts`), once per assignment:
  inside, a 'tensor'-sharded 'mlp' dimension would add it once per shard."""
  n_local = gate_up.shape[0]
  order, token, sizes, mine = sort_by_expert(experts, offset, n_local)
  local = jnp.clip(experts.reshape(-1)[order] - offset, 0, n_local - 1)
  gmm = lambda lhs, rhs: grouped_matmul(lhs, rhs, sizes, kernels_cfg=kernels_cfg)
  xs = xf[token]
  h = clamped_swiglu(gmm(xs, gate_up) + gate_up_bias[local].astype(xs.dtype), alpha, limit)
  scale = jnp.where(mine, weights.reshape(-1), 0)[order]
  out = gmm(h, down) * scale[:, None].astype(xf.dtype)
  return jnp.zeros_like(xf).at[token].add(out)


_EXPERT_AXES = (("expert", "embed", "mlp"), ("expert", "mlp"), ("expert", "mlp", "embed"))


class GptOssExperts(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.cfg, self.kernels_cfg = cfg, kernels_cfg
    self.router = param(rngs, (d, e), ("embed", None), param_dtype)
    self.router_bias = param(rngs, (e,), (None,), param_dtype, "zeros")
    self.gate_up = param(rngs, (e, d, 2 * i), _EXPERT_AXES[0], param_dtype)
    self.gate_up_bias = param(rngs, (e, 2 * i), _EXPERT_AXES[1], param_dtype, "zeros")
    self.down = param(rngs, (e, i, d), _EXPERT_AXES[2], param_dtype)
    self.down_bias = param(rngs, (e, d), ("expert", "embed"), param_dtype, "zeros")

  @jax.named_scope("moe")
  def __call__(self, x, valid):
    """x [b, t, d], valid [b, t] -> (y [b, t, d], balance statistics)."""
    b, t, d = x.shape
    cfg, dt = self.cfg, x.dtype
    xf = x.reshape(b * t, d)
    logits = dense("td,de->te", xf, self.router[...]) + self.router_bias[...].astype(dt)
    weights, experts, probs = route(logits, cfg.num_experts_per_tok)
    fn = functools.partial(routed_experts, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit,
                           kernels_cfg=self.kernels_cfg)
    params = (self.gate_up[...].astype(dt), self.gate_up_bias[...].astype(dt), self.down[...].astype(dt))
    _check_pairs(cfg)
    y = moe_per_shard(fn, (xf, weights, experts), params, kernels_cfg=self.kernels_cfg, param_axes=_EXPERT_AXES)
    bias = jnp.einsum("tk,tkd->td", weights.astype(dt), self.down_bias[...].astype(dt)[experts])
    return (y + bias).reshape(b, t, d), balance_stats(probs, experts, valid.reshape(-1))


def _check_pairs(cfg: TextConfig):
  """Expert-parallel shards split the interleaved gate/up columns over 'tensor' as they lie: an odd
  number of columns per shard would separate a gate from its up."""
  mesh = jax.sharding.get_abstract_mesh()
  tp = 1 if mesh.empty else mesh.shape.get("tensor", 1)
  i = cfg.moe_intermediate_size
  if expert_parallel_size(cfg.num_experts) > 1 and tp > 1 and (2 * i) % tp == 0 and i % tp:
    raise ValueError(f"moe_intermediate_size {i} does not split over 'tensor' ({tp}) in whole (gate, up) pairs")


class GptOssDecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, index: int = 0, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(),
               rngs: nnx.Rngs):
    d = cfg.hidden_size
    norm = functools.partial(RMSNorm, d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs, weight_in_float32=True)
    self.input_norm = norm()
    self.attn = GptOssAttention(cfg, cfg.window(index), param_dtype=param_dtype, kernels_cfg=kernels_cfg, rngs=rngs)
    self.post_attn_norm = norm()
    self.mlp = GptOssExperts(cfg, param_dtype=param_dtype, kernels_cfg=kernels_cfg, rngs=rngs)

  @jax.named_scope("decoder_layer")
  def __call__(self, x, positions, segment_ids, kv=None, cache=None) -> LayerOut:
    a = self.attn(self.input_norm(x), positions, segment_ids, kv, cache)
    x = x + a.out
    y, stats = self.mlp(self.post_attn_norm(x), segment_ids != 0)
    return LayerOut(constrain(x + y, ("batch", "length", None)), stats, a.kv)


class GptOssDecoder(Qwen3Decoder):
  """The decoder skeleton of `Qwen3Decoder` (embedding, layers, final norm, head, cache, load-balancing loss)
  with GPT-OSS layers and its float32-weight final norm."""

  layer_type = GptOssDecoderLayer

  def __init__(self, cfg: TextConfig, **kw):
    super().__init__(cfg, **kw)
    self.norm.weight_in_float32 = True
