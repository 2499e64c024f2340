"""Frozen configuration dataclasses: vision encoder, text decoder, whole model.

Field names follow the paper and REFERENCE.md; `internvl_jax.checkpoint.pretrained` translates from both released
config.json layouts. Configs are hashable, so they can be static arguments of jitted functions.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

RematPolicy = Literal["none", "full", "save_dots"]
AttentionImpl = Literal["auto", "xla", "pallas", "cudnn"]
MoEImpl = Literal["auto", "xla", "pallas"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Which implementation runs attention and the MoE experts (`model/backend.py`): one object that every
  module of the model takes, built from `InternVLConfig`'s three kernel fields."""

  attention: AttentionImpl = "auto"
  moe: MoEImpl = "auto"
  interpret: str | None = None  # 'tpu' or 'gpu': that backend's Pallas kernels in interpret mode


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """InternViT. Defaults are InternViT-300M-448px(-V2_5) (REFERENCE.md §1.1)."""

  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  image_size: int = 448
  patch_size: int = 14
  norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
  norm_eps: float = 1e-6
  qk_norm: bool = False  # 6B: RMSNorm over the full width of q and k, before the head split
  qkv_bias: bool = True
  layer_scale_init: float = 1.0
  drop_path_rate: float = 0.0
  select_layer: int = -1  # -1: last layer; -k: the output of layer num_layers - k + 1

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid(self) -> int:
    """Patches per side of one tile (32 for 448 px / 14 px patches)."""
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """YaRN RoPE (GPT-OSS; transformers' `rope_parameters` with rope_type 'yarn'): inverse frequencies blended
  between interpolated (/factor) and original across the dimensions whose wavelengths fall between
  beta_fast and beta_slow rotations of the original context, and cos/sin scaled by `attention_factor`
  (default 0.1 ln(factor) + 1). `layers.rope_frequencies` computes both."""

  rope_type: Literal["yarn"] = "yarn"
  factor: float = 32.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  original_max_position_embeddings: int = 4096
  truncate: bool = False  # gpt-oss-20b's config says false; transformers' default when absent is true
  attention_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Decoder-only LLM. `arch` selects Qwen3 dense, Qwen3-MoE or GPT-OSS (REFERENCE.md §7.3, §9)."""

  arch: Literal["qwen3", "qwen3_moe", "gpt_oss"] = "qwen3"
  vocab_size: int = 151936
  hidden_size: int = 1024
  num_layers: int = 28
  num_heads: int = 16
  num_kv_heads: int = 8
  head_dim: int = 128
  intermediate_size: int = 3072
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  # Mixture of experts (Qwen3-MoE, GPT-OSS); unused when num_experts == 0.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True
  router_aux_loss_coef: float = 0.001
  max_position_embeddings: int = 40960  # written back to config.json; nothing is computed from it
  # GPT-OSS (REFERENCE.md §9): per-layer 'sliding_attention' / 'full_attention' (empty: all full), the
  # sliding layers' window, YaRN, and the clamped SwiGLU of its experts.
  layer_types: tuple[str, ...] = ()
  sliding_window: int = 0
  rope_scaling: RopeScaling | None = None
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0

  def __post_init__(self):
    if self.layer_types:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
      bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
      if bad:
        raise ValueError(f"unknown layer_types {sorted(bad)} (expected 'sliding_attention' or 'full_attention')")
      if "sliding_attention" in self.layer_types and self.sliding_window <= 0:
        raise ValueError(f"layer_types has sliding layers but sliding_window is {self.sliding_window}")

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def window(self, layer: int) -> int | None:
    """The sliding window of decoder layer `layer`, or None for full attention."""
    if self.layer_types and self.layer_types[layer] == "sliding_attention":
      return self.sliding_window
    return None


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """InternVL3.5-Flash: the Visual Resolution Router (ViR, `model/vir.py`, REFERENCE.md §3).

  A tile's p0 = P(compress) is the router's class-0 probability. rule 'released' (the Flash checkpoints'
  remote code): compress when p0 > the `relative_threshold` quantile of p0 over the request's tiles and
  p0 >= `absolute_threshold` -- so a one-tile request, and the lowest-ranked tiles, are never compressed.
  rule 'absolute': compress when p0 >= `absolute_threshold` alone (any tile, a one-tile request included).
  The released threshold values are unknown to us: `from_pretrained` reads them from config.json and, when
  absent, keeps these defaults (transformers' internvl_flash test values) with a warning.

  pooling 'released' runs attn1/norm1 and then attn2/norm2 three times, as the remote code and lmdeploy do
  (attn3, attn4, norm3, norm4 are in the checkpoint but unused); 'four' runs attn1..attn4 / norm1..norm4 in
  turn, as transformers' internvl_flash port does. The two give different probabilities for the same weights.
  """

  mode: bool = True  # flash_mode: generation routes tiles unless told otherwise (training never does)
  relative_threshold: float = 0.1
  absolute_threshold: float = 0.5
  rule: Literal["released", "absolute"] = "released"
  pooling: Literal["released", "four"] = "released"


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  """ViT-MLP-LLM. `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights.

  Norms, softmax and RoPE always run in float32 whatever `dtype` is.
  """

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  downsample_ratio: float = 0.5  # pixel shuffle scale: 0.5 -> 256 tokens per 448 px tile
  image_token_id: int = 151671  # <IMG_CONTEXT> for the Qwen3 tokenizer (REFERENCE.md §2.6)
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: RematPolicy = "none"
  # Kernels: 'auto' = Pallas on TPU and GPU, XLA elsewhere; 'cudnn' = jax.nn.dot_product_attention's cuDNN.
  attention_impl: AttentionImpl = "auto"
  moe_impl: MoEImpl = "auto"
  # 'tpu' or 'gpu': run that backend's Pallas kernels in interpret mode on any device (tests, debugging).
  pallas_interpret: str | None = None
  # InternVL3.5-Flash: the ViR router and the 64-token projector `mlp2` exist when set (None: plain model).
  flash: FlashConfig | None = None

  @property
  def kernels(self) -> KernelConfig:
    return KernelConfig(self.attention_impl, self.moe_impl, self.pallas_interpret)

  @property
  def tokens_per_tile(self) -> int:
    return int(round(self.vision.grid * self.downsample_ratio)) ** 2

  @property
  def compressed_tokens_per_tile(self) -> int:
    """Tokens of a tile the router compresses: a second pixel shuffle, at downsample_ratio**2 (64 for 448 px)."""
    return int(round(self.vision.grid * self.downsample_ratio ** 2)) ** 2

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "InternVLConfig":
    return dataclasses.replace(self, **kw)
