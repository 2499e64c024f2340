"""GPT-OSS, the decoder of InternVL3.5-20B-A4B (REFERENCE.md §7.1): its parameter shapes (attention with
biases and per-head sinks; a biased router over experts with a fused gate/up projection), so that the model
zoo counts it and checkpoints map onto it. The forward pass arrives with its own issue and raises
NotImplementedError until then; `attention.attention` already takes its `sliding_window` and `sinks`.
"""
from __future__ import annotations

from flax import nnx

from internvl_jax.config import KernelConfig, TextConfig
from internvl_jax.model.layers import RMSNorm, param
from internvl_jax.model.qwen3 import Qwen3Decoder

_NOT_YET = "the GPT-OSS decoder (InternVL3.5-20B-A4B) forward pass is not implemented yet"


class GptOssAttention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
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


class GptOssExperts(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    self.router = param(rngs, (d, e), ("embed", None), param_dtype)
    self.router_bias = param(rngs, (e,), (None,), param_dtype, "zeros")
    self.gate_up = param(rngs, (e, d, 2 * i), ("expert", "embed", "mlp"), param_dtype)
    self.gate_up_bias = param(rngs, (e, 2 * i), ("expert", "mlp"), param_dtype, "zeros")
    self.down = param(rngs, (e, i, d), ("expert", "mlp", "embed"), param_dtype)
    self.down_bias = param(rngs, (e, d), ("expert", "embed"), param_dtype, "zeros")


class GptOssDecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, param_dtype, kernels_cfg: KernelConfig = KernelConfig(), rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = GptOssAttention(cfg, param_dtype=param_dtype, rngs=rngs)
    self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = GptOssExperts(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, *args, **kwargs):
    raise NotImplementedError(_NOT_YET)


class GptOssDecoder(Qwen3Decoder):
  """The decoder skeleton of `Qwen3Decoder` (embedding, layers, final norm, head) with GPT-OSS layers."""

  layer_type = GptOssDecoderLayer

  def __call__(self, *args, **kwargs):
    raise NotImplementedError(_NOT_YET)
