"""Presets for the nine InternVL3.5 models of the paper's Table 1, tiny test presets, and parameter counts.

`python -m internvl_jax.zoo [--json]` prints vision / language / total / active parameters per preset,
computed from abstract shapes (`nnx.eval_shape`: nothing is allocated). Table 1 counts the ViT as
"vision", the LLM as "language", and the MLP projector only in the total.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx

from internvl_jax.config import FlashConfig, InternVLConfig, RopeScaling, TextConfig, VisionConfig
from internvl_jax.model.internvl import InternVL

VIT_300M = VisionConfig()
VIT_6B = VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800, norm_type="rms_norm",
                      qk_norm=True, qkv_bias=False, layer_scale_init=0.1)


def _qwen3(hidden, layers, heads, kv, ffn):
  return TextConfig(arch="qwen3", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                    intermediate_size=ffn)


def _qwen3_moe(hidden, layers, heads, kv, experts, moe_ffn):
  return TextConfig(arch="qwen3_moe", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                    intermediate_size=moe_ffn, num_experts=experts, num_experts_per_tok=8, moe_intermediate_size=moe_ffn)


def alternating(layers: int) -> tuple[str, ...]:
  """GPT-OSS's layer_types: sliding window on even layer indices, full attention on odd ones."""
  return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))


GPT_OSS_20B = TextConfig(arch="gpt_oss", vocab_size=201088, hidden_size=2880, num_layers=24, num_heads=64, num_kv_heads=8,
                         head_dim=64, intermediate_size=2880, rms_norm_eps=1e-5, rope_theta=150000.0,
                         attention_bias=True, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=2880,
                         norm_topk_prob=False, router_aux_loss_coef=0.9, sliding_window=128,
                         layer_types=alternating(24), rope_scaling=RopeScaling(), max_position_embeddings=131072)

# The released InternVL3.5 models untie lm_head even where the Qwen3 base ties it (REFERENCE.md §2.1).
PRESETS: dict[str, InternVLConfig] = {
    "InternVL3.5-1B": InternVLConfig(VIT_300M, _qwen3(1024, 28, 16, 8, 3072)),
    "InternVL3.5-2B": InternVLConfig(VIT_300M, _qwen3(2048, 28, 16, 8, 6144)),
    "InternVL3.5-4B": InternVLConfig(VIT_300M, _qwen3(2560, 36, 32, 8, 9728)),
    "InternVL3.5-8B": InternVLConfig(VIT_300M, _qwen3(4096, 36, 32, 8, 12288)),
    "InternVL3.5-14B": InternVLConfig(VIT_300M, _qwen3(5120, 40, 40, 8, 17408)),
    "InternVL3.5-38B": InternVLConfig(VIT_6B, _qwen3(5120, 64, 64, 8, 25600)),
    "InternVL3.5-20B-A4B": InternVLConfig(VIT_300M, GPT_OSS_20B),
    "InternVL3.5-30B-A3B": InternVLConfig(VIT_300M, _qwen3_moe(2048, 48, 32, 4, 128, 768)),
    "InternVL3.5-241B-A28B": InternVLConfig(VIT_6B, _qwen3_moe(4096, 94, 64, 4, 128, 1536)),
}

# InternVL3.5-Flash: the same models plus the ViR router and `mlp2` (REFERENCE.md §3). No Flash release of the
# GPT-OSS model is known to us.
PRESETS.update({f"{name}-Flash": cfg.replace(flash=FlashConfig()) for name, cfg in list(PRESETS.items())
                if cfg.text.arch != "gpt_oss"})

# Tiny presets for tests and demos: 56 px tiles (4x4 patches -> 4 tokens per tile), vocab 512.
_TINY_VIT = VisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=56,
                         layer_scale_init=0.1)
_TINY_TEXT = TextConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, rope_theta=10000.0)
PRESETS.update({
    "tiny-dense": InternVLConfig(_TINY_VIT, _TINY_TEXT, image_token_id=500),
    "tiny-moe": InternVLConfig(_TINY_VIT, TextConfig(**{**_TINY_TEXT.__dict__, "arch": "qwen3_moe", "num_experts": 4,
                                                        "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
                               image_token_id=500),
    "tiny-6b": InternVLConfig(VisionConfig(**{**_TINY_VIT.__dict__, "norm_type": "rms_norm", "qk_norm": True,
                                              "qkv_bias": False}), _TINY_TEXT, image_token_id=500),
    "tiny-flash": InternVLConfig(_TINY_VIT, _TINY_TEXT, image_token_id=500, flash=FlashConfig()),
    # 4 layers (2 sliding, 2 full) and a window of 8, so that test sequences reach past the window.
    "tiny-gpt-oss": InternVLConfig(_TINY_VIT, TextConfig(
        arch="gpt_oss", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=32, rms_norm_eps=1e-5, rope_theta=150000.0, attention_bias=True, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False, router_aux_loss_coef=0.9,
        sliding_window=8, layer_types=alternating(4), rope_scaling=RopeScaling(), max_position_embeddings=131072),
        image_token_id=500),
})


def get(name: str) -> InternVLConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
  return PRESETS[name]


def _size(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def param_counts(cfg: InternVLConfig) -> dict[str, int]:
  """vision (ViT), projector, language (LLM), total, and active parameters.

  active = total minus the experts a token is not routed to (E - top-k of E per MoE layer), embedding
  tables included (Qwen's convention). Table 1's "A" names are nominal sums of the base LLM's advertised
  active count and the ViT; gpt-oss advertises 3.6B by leaving the input embedding out, so our 4.5B for
  20B-A4B, 3.7B for 30B-A3B and 27.8B for 241B-A28B each lie within 1B of the name (tests/test_zoo.py).
  """
  model = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))
  vision = _size(nnx.state(model.vision_model, nnx.Param))
  projector = _size(nnx.state(model.mlp1, nnx.Param))
  language = _size(nnx.state(model.language_model, nnx.Param))
  flash = sum(_size(nnx.state(getattr(model, m), nnx.Param)) for m in ("mlp2", "pooling_before_gating", "gating")
              if cfg.flash is not None)
  t = cfg.text
  idle = 0
  if t.is_moe:  # dense models: every parameter is active
    expert = sum(int(np.prod(getattr(layer.mlp, n).get_value().shape)) for layer in model.language_model.layers
                 for n in ("gate", "up", "down", "gate_up", "gate_up_bias", "down_bias") if hasattr(layer.mlp, n))
    idle = expert * (t.num_experts - t.num_experts_per_tok) // t.num_experts
  total = vision + projector + language + flash
  return dict(vision_params=vision, projector_params=projector, language_params=language, flash_params=flash,
              total_params=total, active_params=total - idle)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
  args = parser.parse_args(argv)
  rows = [dict(name=name, **param_counts(cfg)) for name, cfg in PRESETS.items()]
  if args.json:
    print(json.dumps(rows, indent=1))
    return
  print(f"{'preset':28s} {'vision':>8s} {'language':>9s} {'total':>8s} {'active':>8s}")
  for r in rows:
    b = lambda k: f"{r[k] / 1e9:.1f}B" if r[k] >= 5e7 else f"{r[k] / 1e6:.2f}M"
    print(f"{r['name']:28s} {b('vision_params'):>8s} {b('language_params'):>9s} {b('total_params'):>8s} "
          f"{b('active_params'):>8s}")


if __name__ == "__main__":
  main()
