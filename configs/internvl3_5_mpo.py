"""Cascade RL, offline stage: MPO of an InternVL3.5 SFT/Instruct checkpoint with the official recipe
(REFERENCE.md §6.4): loss weights 0.8 sigmoid / 0.2 bco_pair / 1.0 sft, β 0.1, lr 2e-7, 256 pairs per step,
one epoch of MMPR-style pairs (set steps = pairs / 256).

  python train.py --config=configs/internvl3_5_mpo.py --workdir=runs/mpo \\
      --config.model.checkpoint=runs/sft/export --config.data.meta=/data/mmpr_meta.json --config.steps=3000

The reference model is a frozen copy of model.checkpoint (a second set of weights in memory). Rows are
unpacked (one question and reply each); the official max_seq_length is 16384, but the MPO step computes full
[rows, tokens, vocab] log-probs, so long rows need few rows per device (or a shorter data.max_tokens).
"""
import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "mpo"
  c.steps = 3000
  c.batch_size = 256  # pairs per step (512 rows)
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.model.checkpoint = "/data/InternVL3_5-8B-Instruct"
  c.model.overrides = ml_collections.ConfigDict(dict(dtype="bfloat16", param_dtype="float32", remat="full"))
  c.data.meta = "/data/mmpr_meta.json"
  c.data.max_tokens = 8192
  c.data.max_tiles_per_row = 24
  c.optim.lr = 2e-7
  c.optim.warmup = 0.03
  c.optim.weight_decay = 0.05
  c.checkpoint.every = 500
  return c
