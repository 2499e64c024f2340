"""Cascade RL, online stage: GSPO of the MPO checkpoint with the official verl recipe (REFERENCE.md §6.5):
512 prompts per round, 16 rollouts each, 16 optimiser steps of 32 prompts per round, lr 1e-6, clip 0.2/0.2, no
KL, accuracy reward, the ViT frozen; questions filtered to rollout accuracy within [0.2, 0.8] (MMPR-Tiny).

  python train.py --config=configs/internvl3_5_gspo.py --workdir=runs/gspo \\
      --config.model.checkpoint=runs/mpo/export --config.data.meta=/data/mmpr_tiny_meta.json

Official lengths are 8192 prompt + 32768 response tokens; rows here hold prompt + response in data.max_tokens.
Thinking-mode data adds the format reward: --config.gspo.rewards.format=0.5 (weights are summed).
"""
import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "gspo"
  c.steps = 1000
  c.batch_size = 32  # prompts per optimiser step (ppo_mini_batch), x 16 rollouts
  c.trainable = ("mlp1", "language_model")
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.model.checkpoint = "/data/InternVL3_5-8B-MPO"
  c.model.overrides = ml_collections.ConfigDict(dict(dtype="bfloat16", param_dtype="float32", remat="full"))
  c.data.meta = "/data/mmpr_tiny_meta.json"
  c.data.max_tokens = 40960
  c.data.max_tiles = 1  # the RL processor: one 448 px tile per image
  c.data.use_thumbnail = False
  c.data.max_tiles_per_row = 8
  c.gspo.group_size = 16
  c.gspo.rollout_prompts = 512
  c.gspo.mini_batches = 16
  c.gspo.max_new_tokens = 32768
  c.optim.lr = 1e-6
  c.optim.warmup = 0.0
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 100
  return c
