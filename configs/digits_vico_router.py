"""ViCO stage 2, router training (paper §2.3, eq. 8-9), on the digits canvases of the ViCO demo.

  python train.py --config=configs/digits_vico_router.py --workdir=runs/vico/router \
      --config.model.checkpoint=runs/vico/consistency/export --config.vico.reference=runs/vico/sft/export

Only the router (pooling + gating) trains. τ is the 60th percentile of the last 4096 loss ratios, not the
paper's balanced 50th: about 62% of this data's tiles hold no digit (WORKSPACE.md, "Flash and ViCO").
"""
from configs import digits_vico_consistency


def get_config():
  c = digits_vico_consistency.get_config()
  c.stage = "vico_router"
  c.steps = 200
  c.vico.percentile = 60.0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 200
  c.eval.meta = ""  # the 256-token path does not change here; the demo scores routing itself
  return c
