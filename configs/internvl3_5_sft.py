"""SFT of a released InternVL3.5 checkpoint with the official recipe (REFERENCE.md §6.3).

  python train.py --config=configs/internvl3_5_sft.py --workdir=runs/sft \
      --config.model.checkpoint=/data/InternVL3_5-8B-Pretrained --config.data.meta=/data/sft_meta.json

Official: global batch 512 packed rows of up to 32768 tokens and 96 tiles, lr 8e-5 (241B: 2e-5), cosine,
warmup 3 %, weight decay 0.05, 8000 steps, bf16, everything trainable, drop path 0.0 (1B-4B), 0.1 (8B-30B),
0.4 (38B, 241B): set `--config.model.overrides.vision.drop_path_rate`. The GPT-OSS MLP warmup stage is
`--config.trainable="('mlp1',)" --config.optim.lr=1e-3`.
"""
import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.steps = 8000
  c.batch_size = 512
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.model.checkpoint = "/data/InternVL3_5-8B-Pretrained"
  c.model.overrides = ml_collections.ConfigDict(dict(dtype="bfloat16", param_dtype="float32", remat="full",
                                                     vision=ml_collections.ConfigDict(dict(drop_path_rate=0.1))))
  c.data.meta = "/data/sft_meta.json"
  c.data.max_tokens = 32768
  c.loss_chunk = 2048  # full [32768, 151936] float32 logits would take 19.9 GB per row
  c.data.max_tiles_per_row = 96
  c.optim.lr = 8e-5
  c.optim.warmup = 0.03
  c.optim.weight_decay = 0.05
  c.checkpoint.every = 500
  return c
