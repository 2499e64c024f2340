"""Optimiser for SFT: AdamW with linear warmup + cosine decay, a weight-decay mask, gradient clipping, and
freezing of whole parts (ViT, MLP projector, LLM) as in the official training stages (REFERENCE.md §6.3).

Frozen parts are not differentiated at all: `split_trainable` separates the parameters the optimiser
sees from those that stay fixed, so a projector-only warmup keeps no Adam moments for the 1B+ frozen rest.
"""
from __future__ import annotations

import optax
from flax import nnx

PARTS = ("vision_model", "mlp1", "language_model")
# InternVL3.5-Flash's ViR router and 64-token projector: outside the loss of SFT, MPO and GSPO (they run the
# 256-token path), so they stay frozen there; weight decay would otherwise shrink them with zero gradients.
FLASH_PARTS = ("mlp2", "pooling_before_gating", "gating")


def decays(path) -> bool:
  """Weight decay applies to every parameter except biases and normalisation weights, as transformers'
  Trainer does (`get_decay_parameter_names`): the official runs train through it."""
  names = [str(p) for p in path]
  return not (names[-1].endswith("bias") or any("norm" in n for n in names))


def split_trainable(params: nnx.State, trainable: tuple[str, ...], *, flash: bool = False):
  """-> (trainable state, frozen state) by top-level part name ('vision_model', 'mlp1', 'language_model'; with
  flash=True, the ViCO stages, also FLASH_PARTS). Otherwise a Flash model's FLASH_PARTS are always frozen."""
  known = PARTS + FLASH_PARTS if flash else PARTS
  unknown = set(trainable) - set(known)
  if unknown:
    hint = "" if flash or not unknown & set(FLASH_PARTS) else " (the ViR parts train only in the ViCO stages)"
    raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {known}{hint}")
  if not trainable:
    raise ValueError("nothing to train: `trainable` is empty")
  train = lambda path, _: str(path[0]) in trainable
  if {str(path[0]) for path, _ in nnx.to_flat_state(params)} <= set(trainable):
    return params, nnx.State({})
  return nnx.split_state(params, train, ...)


def schedule(lr: float, steps: int, warmup: float | int, final_fraction: float = 0.0):
  """Linear warmup from 0 then cosine decay to `final_fraction * lr`. `warmup` < 1 is a fraction of `steps`
  (the official scripts use warmup_ratio 0.03)."""
  warmup_steps = int(round(warmup * steps)) if warmup < 1 else int(warmup)
  return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1),
                                            end_value=final_fraction * lr)


def make_optimizer(cfg, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW from an `optim` config (lr, warmup, final_lr_fraction, weight_decay, b1, b2, eps, clip_norm)."""
  lr = schedule(cfg.lr, steps, cfg.warmup, cfg.get("final_lr_fraction", 0.0))
  mask = lambda params: nnx.map_state(lambda path, v: decays(path), params)
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*chain), lr
