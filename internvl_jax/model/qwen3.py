"""The "LLM" of ViT-MLP-LLM: Qwen3 dense and Qwen3-MoE decoders (REFERENCE.md §7.3).

Pre-norm RMSNorm blocks; grouped-query attention with per-head q/k RMSNorm applied before RoPE; SwiGLU
or MoE feed-forward; tied or untied lm_head. GPT-OSS (InternVL3.5-20B-A4B) builds its parameter shapes
here (attention bias, sinks, router and expert biases) so the model zoo can count it; its forward pass
arrives with its own issue and raises NotImplementedError until then.

Layers are a Python loop over per-layer modules, not a scan: each layer's weights map one-to-one onto
checkpoint tensors, so loading streams tensor by tensor into its sharded slot with no stacking copy.
The price is compile time linear in depth (see WORKSPACE.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import TextConfig
from internvl_jax.model import dispatch
from internvl_jax.model.layers import RMSNorm, cached_attention, call_layer, dense, param, rope, to_storage
from internvl_jax.model.moe import MoE, load_balancing_loss
from internvl_jax.sharding import constrain


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, impl: str = "auto", interpret: str | None = None,
               rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg, self.impl, self.interpret = cfg, impl, interpret
    self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    if cfg.attention_bias and cfg.arch != "gpt_oss":
      raise NotImplementedError(f"attention_bias is only part of GPT-OSS, not {cfg.arch}")
    if cfg.attention_bias:
      self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), param_dtype, "zeros")
      self.k_bias = param(rngs, (kv, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
      self.v_bias = param(rngs, (kv, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
      self.o_bias = param(rngs, (d,), ("embed",), param_dtype, "zeros")
    if cfg.arch == "gpt_oss":
      self.sinks = param(rngs, (n,), ("heads",), param_dtype, "zeros")
    else:  # Qwen3: per-head RMSNorm on q and k, before RoPE
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, axes=("head_dim",), param_dtype=param_dtype, rngs=rngs)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, axes=("head_dim",), param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, segment_ids, kv=None, cache=None):
    """Without a cache: causal attention over x. With one (generation): the new keys/values are written
    at cache['index'] + 0..t-1 of kv = (k_cache [b, kv, h, S], v_cache [b, kv, S, h]), and the queries
    attend to every valid cache slot up to their own; returns (out, new kv)."""
    q = self.q_norm(self.project_in(x, self.q_proj))
    k = self.k_norm(self.project_in(x, self.k_proj))
    v = self.project_in(x, self.v_proj)
    q = rope(q, positions, self.cfg.rope_theta)
    k = rope(k, positions, self.cfg.rope_theta)
    if cache is None:
      out = dispatch.attention(q, k, v, causal=True, segment_ids=segment_ids, impl=self.impl,
                               interpret=self.interpret)
      return self.project_out(out)
    # keys [b, kv, h, S], values [b, kv, S, h]: each decode product (q.k over h, p.v over S) contracts the
    # cache's second-to-last dimension and runs along its last, ~2x faster on XLA:CPU than contracting the last
    k_cache, v_cache = kv
    rows, slots = cache["rows"], cache["slots"]
    k_cache = k_cache.at[rows, :, :, slots].set(to_storage(k, k_cache.dtype))
    v_cache = v_cache.at[rows, :, slots].set(to_storage(v, v_cache.dtype))
    span = cache["span"]  # attend over the first `span` slots only: all that can be valid yet
    out = cached_attention(q, k_cache[..., :span], v_cache[:, :, :span], cache["mask"][:, :, :span])
    return self.project_out(out), (k_cache, v_cache)

  @staticmethod
  def project_in(x, proj):
    """x [b, t, d] @ proj [d, heads, h] -> [b, t, heads, h], as one 2-D product (see project_out)."""
    d, heads, h = proj.shape
    y = dense("btd,df->btf", x, proj[...].reshape(d, heads * h))
    return y.reshape(*x.shape[:2], heads, h)

  def project_out(self, out):
    """[b, t, n, h] -> [b, t, d] over the flattened heads: contracting (n, h) as one dimension makes XLA
    lay out the small activation to match the weight, where it otherwise copied the whole [n, h, d]
    weight into (h, n) order on every decode step (8 MB, ~5 ms per layer on the CPU)."""
    b, t, n, h = out.shape
    return dense("btf,fd->btd", out.reshape(b, t, n * h), self.o_proj[...].reshape(n * h, -1))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
    d, i = cfg.hidden_size, cfg.intermediate_size
    self.gate = param(rngs, (d, i), ("embed", "mlp"), param_dtype)
    self.up = param(rngs, (d, i), ("embed", "mlp"), param_dtype)
    self.down = param(rngs, (i, d), ("mlp", "embed"), param_dtype)

  def __call__(self, x):
    h = jax.nn.silu(dense("btd,di->bti", x, self.gate[...])) * dense("btd,di->bti", x, self.up[...])
    return dense("bti,id->btd", h, self.down[...])


class GptOssExperts(nnx.Module):
  """GPT-OSS expert and router shapes (REFERENCE.md §7.1); no forward pass yet."""

  def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.router = param(rngs, (d, e), ("embed", None), param_dtype)
    self.router_bias = param(rngs, (e,), (None,), param_dtype, "zeros")
    self.gate_up = param(rngs, (e, d, 2 * i), ("expert", "embed", "mlp"), param_dtype)
    self.gate_up_bias = param(rngs, (e, 2 * i), ("expert", "mlp"), param_dtype, "zeros")
    self.down = param(rngs, (e, i, d), ("expert", "mlp", "embed"), param_dtype)
    self.down_bias = param(rngs, (e, d), ("expert", "embed"), param_dtype, "zeros")


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, kernels: dict, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(cfg, param_dtype=param_dtype, impl=kernels["attention_impl"],
                          interpret=kernels["interpret"], rngs=rngs)
    self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    if cfg.arch == "gpt_oss":
      self.mlp = GptOssExperts(cfg, param_dtype=param_dtype, rngs=rngs)
    elif cfg.is_moe:
      self.mlp = MoE(cfg, param_dtype=param_dtype, impl=kernels["moe_impl"], interpret=kernels["interpret"],
                     rngs=rngs)
    else:
      self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, segment_ids, kv=None, cache=None):
    a = self.attn(self.input_norm(x), positions, segment_ids, kv, cache)
    if cache is not None:
      a, kv = a
    x = x + a
    h = self.post_attn_norm(x)
    if isinstance(self.mlp, MoE):
      y, stats = self.mlp(h, segment_ids != 0)
    else:
      y, stats = self.mlp(h), None
    out = constrain(x + y, ("batch", "length", None))
    return (out, stats) if cache is None else (out, stats, kv)


class Qwen3Decoder(nnx.Module):
  """embeds [b, t, d] -> (logits [b, t, vocab], MoE load-balancing loss or None)."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: str = "none", attention_impl: str = "auto",
               moe_impl: str = "auto", interpret: str | None = None, rngs: nnx.Rngs):
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
    kernels = dict(attention_impl=attention_impl, moe_impl=moe_impl, interpret=interpret)
    self.layers = nnx.List([DecoderLayer(cfg, param_dtype=param_dtype, kernels=kernels, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

  def embed(self, input_ids):
    return self.embed_tokens[...][input_ids].astype(self.dtype)

  def head(self):
    """The output projection [embed, vocab] (the embedding table, transposed, when tied)."""
    return self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def __call__(self, x, positions, segment_ids, cache=None, logits_at=None, span=None, return_hidden=False):
    """x: input embeddings [b, t, d]; positions [b, t]; segment_ids [b, t] (0 = padding).

    cache (generation, see generation.py): {'k': per-layer [b, kv, h, S], 'v': per-layer [b, kv, S, h],
    'valid' [b, S], 'index' [b]}; the t tokens go to slots index..index+t-1, and the updated cache is returned
    as a third result.
    logits_at [b]: compute logits only at these positions ([b, 1, vocab]), as generation needs.
    span (static): attention reads only cache slots [0, span), which must hold every valid slot.
    return_hidden: return the final normed hidden states [b, t, d] instead of logits (a chunked loss then
    applies `head()` piece by piece, never holding [b, t, vocab]).
    """
    if self.cfg.arch == "gpt_oss":
      raise NotImplementedError("the GPT-OSS decoder (InternVL3.5-20B-A4B) forward pass is not implemented yet")
    x = constrain(x.astype(self.dtype), ("batch", "length", None))
    stats, new_k, new_v = [], [], []
    meta = None if cache is None else cache_view(cache, segment_ids, span)
    for i, layer in enumerate(self.layers):
      if cache is None:
        x, s = call_layer(layer, self.remat, x, positions, segment_ids)
      else:
        x, s, (k, v) = layer(x, positions, segment_ids, (cache["k"][i], cache["v"][i]), meta)
        new_k.append(k)
        new_v.append(v)
      stats.append(s)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
    x = self.norm(x)
    aux = None
    if self.cfg.is_moe:
      counts, probs, rows = (sum(s[i] for s in stats) for i in range(3))
      aux = load_balancing_loss(counts, probs, rows)
    if return_hidden:
      return x, aux
    logits = dense("btd,dv->btv", x, self.head())
    logits = constrain(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits, aux
    written = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    return logits, aux, {"k": tuple(new_k), "v": tuple(new_v), "valid": meta["valid"],
                         "index": cache["index"] + written}


def cache_view(cache, segment_ids, span=None):
  """Where t new tokens go in the cache and what each may attend to: slots index..index+t-1 (rows, slots
  [b, t] for the scatter), the cache's validity after writing (padding stays invalid), and the mask
  [b, t, S]: valid slots at or before the query's own slot."""
  b, t = segment_ids.shape
  size = cache["valid"].shape[1]
  slots = cache["index"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  valid = cache["valid"].at[rows, slots].set(segment_ids != 0)
  mask = valid[:, None, :] & (jnp.arange(size)[None, None, :] <= slots[:, :, None])
  return {"rows": rows, "slots": slots, "valid": valid, "mask": mask, "span": span or size}
