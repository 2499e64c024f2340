"""ViCO stage 1, consistency training (paper §2.3, eq. 7), on the digits canvases of the ViCO demo.

  python -m internvl_jax.demos.vico --workdir=runs/vico                  # the whole demo (builds the data)
  python train.py --config=configs/digits_vico_consistency.py --workdir=runs/vico/consistency \
      --config.model.checkpoint=runs/vico/sft/export

From a plain checkpoint the model becomes a Flash one: `mlp2` and the router start from random init; the
whole model except the router trains against a frozen copy of the starting checkpoint (each image at 16 or
4 tokens per tile, drawn per image for half the images and per tile for the other half).
"""
from configs import digits_canvas


def get_config():
  c = digits_canvas.get_config()
  c.stage = "vico_consistency"
  c.trainable = ("vision_model", "mlp1", "mlp2", "language_model")
  c.steps = 500
  c.optim.lr = 5e-4
  # Half the images draw ξ per tile: the tiny model does not carry one-ξ-per-image training over to the mixed
  # images routing makes (measured: routed accuracy 10% against 42% with every tile compressed).
  c.vico.tile_mix = 0.5
  c.checkpoint.every = 500
  c.eval.every = 500
  return c
