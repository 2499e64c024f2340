"""Cascade RL on the digits demo, offline stage: MPO from the SFT run's export on pairs of the model's own
rollouts (`python -m internvl_jax.training.rl.pairs`; `python -m internvl_jax.training.rl.cascade` runs the whole cascade).

  python train.py --config=configs/digits_mpo.py --workdir=runs/digits_mpo \\
      --config.model.checkpoint=runs/digits_sft/export --config.data.meta=runs/digits_pairs/meta.json
"""
from configs import digits


def get_config():
  c = digits.get_config()
  c.stage = "mpo"
  c.model.checkpoint = "runs/digits_sft/export"
  c.data.meta = "runs/digits_pairs/meta.json"
  c.data.max_tokens = 64  # unpacked rows: one question and reply each
  c.data.max_tiles_per_row = 1
  c.steps = 300
  c.batch_size = 16  # pairs per step (32 rows)
  c.optim.lr = 1e-3
  c.optim.warmup = 0.05
  c.checkpoint.every = 100
  c.eval.every = 300
  c.log_every = 20
  return c
