"""The two ViCO stages as `train.py` runs them (`config.stage` = 'vico_consistency' or 'vico_router'; the
steps are `training/vico.py`).

  python train.py --config=configs/digits_vico_consistency.py --workdir=runs/vico1 --config.model.checkpoint=SFT
  python train.py --config=configs/digits_vico_router.py --workdir=runs/vico2 --config.model.checkpoint=runs/vico1/export --config.vico.reference=SFT

Both read SFT data (`config.data`, packed rows) and a frozen reference model: `config.vico.reference`, or in
the consistency stage by default the starting checkpoint itself (a plain InternVL3.5 becomes a Flash model:
`mlp2` and the router start from random init, so `trainable` must list 'mlp2'). The router stage trains
only the router, whatever `trainable` says, and needs the reference the consistency stage started from (its
own starting point, the consistency stage's export, would make eq. 8's denominator the KL of a model with
itself). Its τ window is checkpointed with the train state, so a resumed run continues with the same window;
the data iterator's state and the step-derived ξ draws make a resumed run repeat the uninterrupted one.
Evaluation (`eval.meta`) scores the 256-token path, as for SFT; the export is a Flash checkpoint.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from internvl_jax import data as data_lib
from internvl_jax import sharding
from internvl_jax.checkpoint import pretrained as ckpt_lib
from internvl_jax.model import vir
from internvl_jax.training import loop, sft, vico
from internvl_jax.training.metrics import console

_SAME_FIELDS = ("vision", "text", "downsample_ratio", "image_token_id")


def reference_model(path: str, model_cfg, mesh):
  """The frozen π_ref, loaded with the run's dtypes and kernels; its architecture must be the policy's."""
  ref = ckpt_lib.from_pretrained(path, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, mesh=mesh,
                                 remat=model_cfg.remat, attention_impl=model_cfg.attention_impl,
                                 moe_impl=model_cfg.moe_impl, pallas_interpret=model_cfg.pallas_interpret)
  differ = [f for f in _SAME_FIELDS if getattr(ref.cfg, f) != getattr(model_cfg, f)]
  if differ:
    raise ValueError(f"config.vico.reference={path}: its {', '.join(differ)} differ from the trained model's; the "
                     "reference must be the model ViCO starts from")
  return ref


def train_vico(cfg, workdir: str) -> dict:
  """Run (or resume) the ViCO stage `cfg.stage` in `workdir`. Returns the last train and eval metrics."""
  stage, v = cfg.stage, cfg.vico
  router = stage == "vico_router"
  reference = v.reference or ("" if router else cfg.model.checkpoint)
  if not reference:
    raise ValueError(f"config.stage={stage!r} needs config.vico.reference: the model the consistency stage "
                     "started from" if router else f"config.stage={stage!r} starts from a checkpoint "
                     "(config.model.checkpoint): the reference is a frozen copy of it")
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size={cfg.batch_size} rows do not split over {jax.process_count()} processes")
  if not router and cfg.model.checkpoint and "mlp2" not in cfg.trainable and \
      not ckpt_lib.is_flash_checkpoint(cfg.model.checkpoint):
    raise ValueError(f"config.trainable={tuple(cfg.trainable)}: {cfg.model.checkpoint} has no mlp2, which starts "
                     "from random init here; list 'mlp2' in trainable")
  local_rows = cfg.batch_size // jax.process_count()
  mesh = sharding.make_mesh(dict(cfg.mesh))
  loop.check_rows(mesh, cfg.batch_size, f"batch_size={cfg.batch_size}")

  def window_state(mesh):
    replicated = jax.NamedSharding(mesh, jax.P())
    return vico.window_init(v.window), vico.RouterWindow(replicated, replicated)

  run = loop.prepare(cfg, workdir, mesh=mesh, extra=window_state if router else None,
                     trainable=vico.ROUTER_PARTS if router else None,
                     make_iterator=lambda processor: data_lib.make_iterator(
                         cfg.data, processor, batch_size=local_rows, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=jax.process_count()))
  (state, window), setup, iterator = (run.state if router else (run.state, None)), run.setup, run.iterator
  if router:  # a fresh window is not yet placed: the step's input sharding would otherwise change after step 1
    window = jax.device_put(window, jax.NamedSharding(mesh, jax.P()))
  ref_graphdef, ref_params, ref_rest = nnx.split(reference_model(reference, run.model_cfg, mesh), nnx.Param, ...)
  ref_sh = sharding.state_shardings(ref_params, mesh)
  text = run.model_cfg.text
  if router:
    step_cfg = vico.RouterConfig(percentile=v.percentile, eps=v.eps, loss_chunk=cfg.loss_chunk)
  else:
    step_cfg = vico.ConsistencyConfig(compress_prob=v.compress_prob, tile_mix=v.tile_mix, ntp_weight=v.ntp_weight,
                                      loss_chunk=cfg.loss_chunk,
                                      aux_loss_coef=text.router_aux_loss_coef if text.is_moe else 0.0,
                                      drop_path=run.model_cfg.vision.drop_path_rate > 0)
  step_fn = None
  step = int(jax.device_get(state.step))
  log = loop.StepLog(run, cfg)
  while step < cfg.steps:
    local = next(iterator)
    if "pixel_values" not in local:
      raise ValueError("ViCO trains on images: the data gave a batch without pixel_values")
    pixels = local["pixel_values"]
    t, _ = vir.tile_tokens(run.model_cfg, pixels.shape[1:])
    local.update(vico.tile_layout(local["input_ids"], local["segment_ids"], run.model_cfg.image_token_id, t,
                                  pixels.shape[1]))
    batch = sft.global_batch(local, mesh, keys=vico.BATCH_KEYS)
    if step_fn is None:
      if router:
        vico.check_window(v.window, cfg.batch_size * pixels.shape[1])
      step_fn = vico.make_step(stage, setup.graphdef, setup.rest, ref_graphdef, ref_rest, setup.tx, mesh,
                               setup.state_sh, ref_sh, {k: x.sharding for k, x in batch.items()}, step_cfg)
    if router:
      state, window, metrics = step_fn(state, window, ref_params, batch)
    else:
      state, metrics = step_fn(state, ref_params, batch)
    step += 1
    log.step(step, metrics, int(np.sum(local["segment_ids"] > 0)) * jax.process_count(),
             extra=lambda: {"skipped_samples": iterator.stats()["skipped"]})
    run.checkpointer.save(step, (state, window) if router else state, iterator, force=step == cfg.steps)
    log.end_of_step(step, state)
  loop.finish(cfg, run, state, workdir)
  if router:
    console.info(f"router: tau {log.last.get('tau', float('nan')):.4g} over the last {min(int(window.count), v.window)} "
                 "ratios")
  return log.last
