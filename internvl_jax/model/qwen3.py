"""The "LLM" of ViT-MLP-LLM: Qwen3 dense and Qwen3-MoE decoders (REFERENCE.md §7.3).

Pre-norm RMSNorm blocks; grouped-query attention with per-head q/k RMSNorm applied before RoPE; SwiGLU
or MoE feed-forward; tied or untied lm_head. GPT-OSS (`gpt_oss.py`) reuses the decoder skeleton.

Layers are a Python loop over per-layer modules, not a scan: each layer's weights map one-to-one onto
checkpoint tensors, so loading streams tensor by tensor into its sharded slot with no stacking copy.
The price is compile time linear in depth (see WORKSPACE.md).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from internvl_jax.config import KernelConfig, TextConfig
from internvl_jax.model import attention
from internvl_jax.model.layers import RMSNorm, call_layer, dense, param, rope
from internvl_jax.model.moe import MoE, load_balancing_loss
from internvl_jax.sharding import constrain


class AttentionOut(NamedTuple):
  out: jax.Array  # [b, t, d]
  kv: Any  # the layer's updated (keys, values) cache, or None without a cache


class LayerOut(NamedTuple):
  x: jax.Array  # [b, t, d]
  moe_stats: Any  # MoE balance statistics (counts [E], probability sums [E], rows), or None for a dense MLP
  kv: Any


class DecoderOut(NamedTuple):
  logits: jax.Array  # [b, t, vocab] (t = 1 with logits_at)
  hidden: jax.Array  # the final normed hidden states [b, t, d] (a chunked loss applies `head()` itself)
  moe_aux_loss: jax.Array  # scalar; 0 for a dense decoder
  cache: Any  # the updated KV cache, or None without one


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.attention_bias:
      raise NotImplementedError(f"attention_bias is only part of GPT-OSS, not {cfg.arch}")
    self.cfg, self.kernels_cfg = cfg, kernels_cfg
    self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    # Qwen3: per-head RMSNorm on q and k, before RoPE
    self.q_norm = RMSNorm(h, cfg.rms_norm_eps, axes=("head_dim",), param_dtype=param_dtype, rngs=rngs)
    self.k_norm = RMSNorm(h, cfg.rms_norm_eps, axes=("head_dim",), param_dtype=param_dtype, rngs=rngs)

  @jax.named_scope("attention")
  def __call__(self, x, positions, segment_ids, kv=None, cache=None) -> AttentionOut:
    """Without a cache: causal attention over x. With one (generation; `cache` is `attention.cache_view`'s
    view): the new keys/values are written at the view's slots of kv = (keys [b, kv, h, S], values
    [b, kv, S, h]), and the queries attend to every valid cache slot up to their own."""
    q = self.q_norm(project_in(x, self.q_proj))
    k = self.k_norm(project_in(x, self.k_proj))
    v = project_in(x, self.v_proj)
    q = rope(q, positions, self.cfg.rope_theta)
    k = rope(k, positions, self.cfg.rope_theta)
    if cache is None:
      out = attention.attention(q, k, v, causal=True, segment_ids=segment_ids, kernels_cfg=self.kernels_cfg)
      return AttentionOut(project_out(out, self.o_proj), None)
    out, kv = attention.cached_attention(q, k, v, kv, cache, kernels_cfg=self.kernels_cfg)
    return AttentionOut(project_out(out, self.o_proj), kv)


def project_in(x, proj):
  """x [b, t, d] @ proj [d, heads, h] -> [b, t, heads, h], as one 2-D product (see project_out)."""
  d, heads, h = proj.shape
  return rearrange(dense("btd,df->btf", x, proj[...].reshape(d, heads * h)), "b t (n h) -> b t n h", n=heads)


def project_out(out, proj):
  """[b, t, n, h] @ proj [n, h, d] -> [b, t, d] over the flattened heads: contracting (n, h) as one dimension
  makes XLA lay out the small activation to match the weight, where it otherwise copied the whole [n, h, d]
  weight into (h, n) order on every decode step (8 MB, ~5 ms per layer on the CPU)."""
  n, h, d = proj.shape
  return dense("btf,fd->btd", rearrange(out, "b t n h -> b t (n h)"), proj[...].reshape(n * h, d))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
    d, i = cfg.hidden_size, cfg.intermediate_size
    self.gate = param(rngs, (d, i), ("embed", "mlp"), param_dtype)
    self.up = param(rngs, (d, i), ("embed", "mlp"), param_dtype)
    self.down = param(rngs, (i, d), ("mlp", "embed"), param_dtype)

  @jax.named_scope("mlp")
  def __call__(self, x):
    h = jax.nn.silu(dense("btd,di->bti", x, self.gate[...])) * dense("btd,di->bti", x, self.up[...])
    return dense("bti,id->btd", h, self.down[...])


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, index: int = 0, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(cfg, param_dtype=param_dtype, kernels_cfg=kernels_cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    if cfg.is_moe:
      self.mlp = MoE(cfg, param_dtype=param_dtype, kernels_cfg=kernels_cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

  @jax.named_scope("decoder_layer")
  def __call__(self, x, positions, segment_ids, kv=None, cache=None) -> LayerOut:
    a = self.attn(self.input_norm(x), positions, segment_ids, kv, cache)
    x = x + a.out
    h = self.post_attn_norm(x)
    if isinstance(self.mlp, MoE):
      y, stats = self.mlp(h, segment_ids != 0)
    else:
      y, stats = self.mlp(h), None
    return LayerOut(constrain(x + y, ("batch", "length", None)), stats, a.kv)


class Qwen3Decoder(nnx.Module):
  """embeds [b, t, d] -> DecoderOut (logits, final hidden states, MoE load-balancing loss, cache)."""

  layer_type = DecoderLayer

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: str = "none",
               kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
    self.layers = nnx.List([self.layer_type(cfg, i, param_dtype=param_dtype, kernels_cfg=kernels_cfg, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

  def embed(self, input_ids):
    return self.embed_tokens[...][input_ids].astype(self.dtype)

  def head(self):
    """The output projection [embed, vocab] (the embedding table, transposed, when tied)."""
    return self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def __call__(self, x, positions, segment_ids, cache=None, logits_at=None, span=None, fresh=False) -> DecoderOut:
    """x: input embeddings [b, t, d]; positions [b, t]; segment_ids [b, t] (0 = padding).

    cache (generation, see inference/engine.py): {'k': per-layer [b, kv, h, S], 'v': per-layer [b, kv, S, h],
    'valid' [b, S], 'index' [b]}; the t tokens go to slots index..index+t-1, and the updated cache is returned.
    logits_at [b]: compute logits only at these positions ([b, 1, vocab]), as generation needs.
    span (static): attention reads only cache slots [0, span), which must hold every valid slot.
    fresh (static): the cache is empty before these tokens (a prefill; see `attention.cached_attention`).
    GPT-OSS's sliding layers keep a ring of `sliding_window` slots instead of S (`init_cache`).
    """
    x = constrain(x.astype(self.dtype), ("batch", "length", None))
    stats, new_k, new_v = [], [], []
    view = None if cache is None else attention.cache_view(cache, segment_ids, span, fresh)
    for i, layer in enumerate(self.layers):
      if cache is None:
        out = call_layer(layer, self.remat, x, positions, segment_ids)
      else:
        out = layer(x, positions, segment_ids, (cache["k"][i], cache["v"][i]), view)
        new_k.append(out.kv[0])
        new_v.append(out.kv[1])
      x = out.x
      stats.append(out.moe_stats)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
    x = self.norm(x)
    aux = jnp.zeros((), jnp.float32)
    if self.cfg.is_moe:
      counts, probs, rows = (sum(s[i] for s in stats) for i in range(3))
      aux = load_balancing_loss(counts, probs, rows)
    logits = constrain(dense("btd,dv->btv", x, self.head()), ("batch", "length", "vocab"))
    new_cache = None
    if cache is not None:
      written = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
      new_cache = {"k": tuple(new_k), "v": tuple(new_v), "valid": view["valid"], "index": cache["index"] + written}
    return DecoderOut(logits, x, aux, new_cache)
