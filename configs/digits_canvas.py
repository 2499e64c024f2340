"""SFT on the digits canvases of the ViCO demo (2x2 canvases of 56 px cells, 4 tiles each, "Which digits are
shown?"), from the digits SFT export, at 16 tokens per tile: the plain model ViCO then makes a Flash one.

  python train.py --config=configs/digits_canvas.py --workdir=runs/vico/sft --config.model.checkpoint=runs/digits/export
"""
from configs import digits


def get_config():
  c = digits.get_config()
  c.data_root = "data/digits_canvas"  # python -m internvl_jax.demos.vico builds it
  root = c.get_ref("data_root")
  c.data.meta = root + "/canvas_train_meta.json"
  c.eval.meta = root + "/canvas_eval_meta.json"
  c.model.preset = ""
  c.data.max_tiles = 4  # a 2x2 canvas of 56 px cells: one tile per cell, no thumbnail
  c.data.max_tiles_per_row = 12
  c.steps = 800
  c.optim.lr = 1e-3
  c.checkpoint.every = 800
  c.eval.every = 800
  c.eval.generate = 200
  c.eval.max_new_tokens = 8
  return c
