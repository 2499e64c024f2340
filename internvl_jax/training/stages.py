"""The training stages `train.py` runs, by `config.stage`: 'sft' (supervised fine-tuning and pre-training,
`loop.train_sft`), and the Cascade RL stages (paper §2.3) 'mpo' (offline, `rl/mpo.py`) and 'gspo' (online,
`rl/gspo.py`), each starting from the previous stage's export (`config.model.checkpoint`), and ViCO's two stages
(paper §2.3, InternVL3.5-Flash) 'vico_consistency' and 'vico_router' (`vico_stage.py`). This registry sits
above every stage; no stage imports it."""
from __future__ import annotations

from internvl_jax.training import loop, vico_stage
from internvl_jax.training.rl import gspo, mpo

STAGES = {"sft": loop.train_sft, "mpo": mpo.train_mpo, "gspo": gspo.train_gspo,
          "vico_consistency": vico_stage.train_vico, "vico_router": vico_stage.train_vico}


def train(cfg, workdir: str) -> dict:
  """Run (or resume) the stage `cfg.stage` ('sft' when unset) described by `cfg` in `workdir`. Returns the
  last train and eval metrics."""
  stage = cfg.get("stage", "sft")
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r}; known: {', '.join(map(repr, STAGES))}")
  return STAGES[stage](cfg, workdir)
