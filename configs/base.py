"""Defaults shared by every training config; a config file copies them and changes what it needs.

Every knob here is one a run needs: model source, data, mesh, optimiser, schedule, batch, checkpoints,
logging and evaluation. Model architecture lives in `internvl_jax/zoo.py` presets or a checkpoint's config.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # 'sft' (also pre-training); a Cascade RL stage: 'mpo' (offline), 'gspo' (online); a ViCO stage
  # (InternVL3.5-Flash, after Cascade RL): 'vico_consistency', then 'vico_router'
  c.stage = "sft"
  c.seed = 0
  c.steps = 1000
  c.batch_size = 8  # global rows (packed sequences) per optimiser step, over all processes
  c.accum_steps = 1  # micro-batches per step (the batch is split, the loss normalised over all of it)
  c.loss_chunk = 0  # > 0: logits and loss this many positions at a time (needed for 32K rows x 152K vocab)
  c.trainable = ("vision_model", "mlp1", "language_model")  # official stages: ('mlp1',) for the MLP warmup
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))  # -1: the remaining devices

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""  # a released checkpoint folder (either layout); or leave empty and set preset
  c.model.preset = ""  # a zoo preset trained from scratch (its tokenizer from model.tokenizer)
  c.model.tokenizer = ""  # folder with tokenizer.json, when training from a preset
  # InternVLConfig fields; nested `vision` / `text` dicts override VisionConfig / TextConfig fields.
  c.model.overrides = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", remat="none"))

  c.data = ml_collections.ConfigDict()
  c.data.meta = ""  # InternVL meta JSON: {name: {root, annotation, repeat_time, data_augment, ...}}
  c.data.max_tokens = 4096  # packed row length
  c.data.max_tiles_per_row = 24  # image tiles a packed row may hold (official: num_images_expected)
  c.data.pack = True
  c.data.min_tiles = 1
  c.data.max_tiles = 12
  c.data.use_thumbnail = True
  c.data.template = "internvl2_5"
  c.data.buffer_size = 20  # open rows of the greedy packer (official max_buffer_size)

  c.optim = ml_collections.ConfigDict(dict(lr=8e-5, warmup=0.03, final_lr_fraction=0.0, weight_decay=0.05,
                                           b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0))

  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.export = "hf"  # layout of workdir/export at the end: 'hf', 'original', or '' for none
  c.log_every = 10
  c.tensorboard = True

  # Cascade RL (paper §2.3). MPO: batch_size = preference pairs per step; data.meta names MMPR-style JSONL.
  c.mpo = ml_collections.ConfigDict(dict(beta=0.1, weights=(0.8, 0.2, 1.0)))  # sigmoid, bco_pair, sft
  # GSPO: batch_size = prompts per optimiser step (x group_size rows); data.meta names questions (last gpt
  # turn = the reference answer). Each round samples rollout_prompts x group_size responses from the current
  # parameters (again, up to max_draws times, until mini_batches x batch_size prompts have a rollout accuracy
  # within accuracy_range), then takes mini_batches steps. max_rows: rows per generation call.
  c.gspo = ml_collections.ConfigDict(dict(
      group_size=16, rollout_prompts=512, mini_batches=16, max_draws=4, accuracy_range=(0.2, 0.8),
      max_new_tokens=1024, temperature=1.0, top_p=1.0, max_rows=64,
      rewards=ml_collections.ConfigDict(dict(accuracy=1.0)), policy_loss="gspo", eps_low=0.2, eps_high=0.2))

  # ViCO (paper §2.3, training/vico.py). reference: the frozen π_ref's checkpoint (consistency: default the
  # starting checkpoint; router: required, the model consistency training started from). compress_prob: P(an
  # image takes 64 tokens per tile) in consistency training; tile_mix: the fraction of images whose tiles draw
  # it one by one instead (paper: 0, one per image); ntp_weight: its square-averaged NTP term (paper: none).
  # Router: τ = the `percentile`-th percentile of the last `window` ratios r_i (eq. 8-9); eps in r_i.
  c.vico = ml_collections.ConfigDict(dict(reference="", compress_prob=0.5, tile_mix=0.0, ntp_weight=0.0,
                                          window=4096, percentile=50.0, eps=1e-6))

  c.eval = ml_collections.ConfigDict()
  c.eval.meta = ""  # held-out data in the same format; empty = no evaluation
  c.eval.every = 500
  c.eval.max_batches = 8  # held-out loss over this many batches
  c.eval.generate = 0  # held-out questions answered greedily and scored (0 = loss only)
  c.eval.max_new_tokens = 32
  c.eval.scorer = "final_answer"  # see internvl_jax/training/evaluation.py SCORERS
  return c
