"""The README demo: a tiny InternVL trained from scratch on scikit-learn's handwritten digits.

  python -m internvl_jax.demos.digits --out data/digits          # images, JSONL, meta files, tokenizer
  python train.py --config=configs/digits.py --workdir=runs/digits

A 56 px tile of 7 px patches (8x8: one patch per pixel of the 8x8 scan) gives 16 tokens after pixel
shuffle. `--config.data_root=DIR` points at data built elsewhere.
"""
import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.data_root = "data/digits"
  root = c.get_ref("data_root")
  c.model.tokenizer = root
  c.data.meta = root + "/train_meta.json"
  c.eval.meta = root + "/eval_meta.json"
  c.steps = 600
  c.batch_size = 8
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.model.preset = "tiny-dense"
  c.model.overrides.vision = ml_collections.ConfigDict(dict(
      image_size=56, patch_size=7, hidden_size=64, num_heads=4, intermediate_size=256, num_layers=2))
  c.model.overrides.text = ml_collections.ConfigDict(dict(
      hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384))
  c.data.max_tokens = 256
  c.data.max_tiles_per_row = 10
  c.data.max_tiles = 1
  c.data.use_thumbnail = False
  c.optim.lr = 2e-3
  c.optim.warmup = 0.05
  c.optim.weight_decay = 0.01
  c.checkpoint.every = 200
  c.log_every = 20
  c.eval.every = 300
  c.eval.max_batches = 4
  c.eval.generate = 1000  # every held-out question (360 single, 300 sums)
  c.eval.max_new_tokens = 16
  c.export = "hf"
  return c

