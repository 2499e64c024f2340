"""The run behind `train.py`: model and sharded train state, data, the SFT loop, orbax checkpoints,
evaluation and export. Each function takes the ml_collections config (see `configs/`); `train_sft(cfg,
workdir)` runs the SFT stage, and the Cascade RL stages (`rl/mpo.py`, `rl/gspo.py`) share the rest (`prepare`,
`Run`, `StepLog`, `finish`, `Checkpointer`, `export`); `stages.train` picks the stage of a config.

Workdir layout:
  checkpoints/<step>/{state, data}   orbax: the TrainState (every process writes its own shards) and each
                                     process's data-iterator state (process_<i>-of-<n>.json)
  model/                             config.json (transformers layout) + tokenizer files, written at start
  export/                            the final weights as a released-format checkpoint (serve.py reads it)
  metrics.jsonl, tensorboard/        see metrics.py
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from internvl_jax.checkpoint import pretrained as ckpt_lib
from internvl_jax import data as data_lib
from internvl_jax import sharding, zoo
from internvl_jax.training import evaluation
from internvl_jax.training import optim
from internvl_jax.training import sft
from internvl_jax.config import FlashConfig, InternVLConfig, TextConfig, VisionConfig
from internvl_jax.model.internvl import InternVL, init_model
from internvl_jax.training.metrics import MetricsWriter, console
from internvl_jax.inputs.processor import Processor
from internvl_jax.inputs.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ model

def tokenizer_dir(cfg) -> str:
  folder = cfg.model.checkpoint or cfg.model.tokenizer
  if not folder:
    raise ValueError("config: set model.checkpoint (a released checkpoint folder) or model.tokenizer (a folder "
                     "with tokenizer.json) for a model trained from a preset")
  return folder


def is_vico(cfg) -> bool:
  """Whether the config runs a ViCO stage (`training/vico.py`): the only stages that train the ViR parts."""
  return cfg.get("stage", "sft") in ("vico_consistency", "vico_router")


def model_config(cfg, tokenizer: Tokenizer) -> InternVLConfig:
  """The InternVLConfig of a run: the checkpoint's or the preset's, with the config's overrides. A model
  trained from scratch takes its vocabulary size and <IMG_CONTEXT> id from the tokenizer. A ViCO stage makes
  a plain model a Flash one (FlashConfig's defaults; `initial_model` initialises the new parts)."""
  m = cfg.model
  overrides = dict(m.get("overrides", {}) or {})
  vision, text = dict(overrides.pop("vision", {}) or {}), dict(overrides.pop("text", {}) or {})
  if m.checkpoint:
    base, _ = ckpt_lib.load_config(m.checkpoint)
  else:
    base = zoo.get(m.preset)
    size = tokenizer.tok.get_vocab_size(with_added_tokens=True)
    text.setdefault("vocab_size", -(-size // 128) * 128)  # a multiple of 128 keeps the vocab axis shardable
    overrides.setdefault("image_token_id", tokenizer.image_token_id)
  if is_vico(cfg) and base.flash is None:
    base = base.replace(flash=FlashConfig())
  try:
    return base.replace(vision=dataclasses.replace(base.vision, **vision), text=dataclasses.replace(base.text, **text),
                        **overrides)
  except TypeError as e:
    raise ValueError(f"config.model.overrides: {e} (fields: InternVLConfig {_fields(InternVLConfig)}, vision "
                     f"{_fields(VisionConfig)}, text {_fields(TextConfig)})") from None


def _fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def make_processor(cfg, model_cfg: InternVLConfig, tokenizer: Tokenizer) -> Processor:
  tokenizer.check_model_config(model_cfg)
  d = cfg.data
  return Processor(tokenizer, tokens_per_tile=model_cfg.tokens_per_tile, tile_size=model_cfg.vision.image_size,
                   min_tiles=d.min_tiles, max_tiles=d.max_tiles, use_thumbnail=d.use_thumbnail, template=d.template)


def initial_model(cfg, model_cfg: InternVLConfig, mesh) -> InternVL:
  """The run's starting model: the checkpoint's weights, or a random init of a preset. A Flash config over a
  plain checkpoint (a ViCO stage) loads the checkpoint and adds `mlp2` and the router at random init (seed
  `cfg.seed`)."""
  if not cfg.model.checkpoint:
    return init_model(model_cfg, seed=cfg.seed, mesh=mesh)
  overrides = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
               if f.name not in ("dtype", "param_dtype")}
  load = functools.partial(ckpt_lib.from_pretrained, cfg.model.checkpoint, dtype=model_cfg.dtype,
                           param_dtype=model_cfg.param_dtype, mesh=mesh)
  if model_cfg.flash is None or ckpt_lib.is_flash_checkpoint(cfg.model.checkpoint):
    return load(**overrides)
  plain = load(**dict(overrides, flash=None))
  model = init_model(model_cfg, seed=cfg.seed, mesh=mesh)
  nnx.update(model, nnx.state(plain))
  console.info(f"{cfg.model.checkpoint} has no ViR: mlp2 and the router start from random init (seed {cfg.seed})")
  return model


# ------------------------------------------------------------------------------------------ checkpoints

class _IteratorState:
  """The data iterator as grain's orbax handler expects it (bytes in and out), snapshotted at save time so
  an asynchronous save writes the state of the step it belongs to."""

  def __init__(self, iterator):
    self.iterator = iterator
    self.state = json.dumps(iterator.get_state()).encode() if iterator is not None else b"{}"

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    if self.iterator is not None:  # GSPO keeps none (its data is a function of the step); MPO a pair cursor
      self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


_ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep  # .../site-packages/orbax/


class OrbaxInfoFilter(logging.Filter):
  """Drops orbax's INFO and DEBUG records (dozens per checkpoint save or restore, which would bury a run's
  progress lines); its warnings and errors, and every record not from orbax, pass. orbax logs through
  absl.logging: records of the 'absl' logger, told apart by the file that made them; a few of its modules
  use loggers named orbax.*."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not (record.name == "orbax" or record.name.startswith("orbax.") or
                os.path.abspath(record.pathname).startswith(_ORBAX_DIR))


def quiet_orbax() -> None:
  """Keeps orbax's INFO lines off the console (idempotent; `Checkpointer` calls it). To see them again, remove
  the OrbaxInfoFilter from `logging.getLogger("absl").filters` and set the 'orbax' logger's level."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, OrbaxInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(OrbaxInfoFilter())
  orbax_logger = logging.getLogger("orbax")  # the parent of the few orbax modules with loggers of their own
  if orbax_logger.level == logging.NOTSET:
    orbax_logger.setLevel(logging.WARNING)


class Checkpointer:
  """orbax CheckpointManager over workdir/checkpoints: async saves every `every` steps, the last `keep`.
  orbax's INFO lines are kept off the console (`quiet_orbax`); its warnings and errors still show."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    import grain
    quiet_orbax()
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: sft.TrainState, iterator, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (and when forced: the last step); returns whether it saved."""
    import grain
    if step % self.every and not force:
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(iterator))),
        force=True)

  def restore(self, step: int, abstract: sft.TrainState, shardings: sft.TrainState, iterator) -> sft.TrainState:
    import grain
    # shardings is a prefix of abstract (one NamedSharding per nnx.Variable holding the array).
    target = jax.tree.map(lambda s, sub: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub),
                          shardings, abstract)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(_IteratorState(iterator))))
    return restored["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_model_folder(folder: str, model_cfg: InternVLConfig, tok_dir: str) -> None:
  """config.json + tokenizer files, so that serve.py / Processor.from_pretrained can read the folder."""
  if jax.process_index() != 0:
    return
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(ckpt_lib.config_to_dict(model_cfg, "hf"), f, indent=2)
  _copy_tokenizer(tok_dir, folder)


def _copy_tokenizer(tok_dir: str, folder: str) -> None:
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(tok_dir, name)):
      shutil.copy(os.path.join(tok_dir, name), os.path.join(folder, name))


def export(model: InternVL, folder: str, tok_dir: str, layout: str = "hf") -> None:
  """A released-format checkpoint (config, safetensors, tokenizer) of the trained weights."""
  ckpt_lib.save_pretrained(model, folder, layout=layout)
  _copy_tokenizer(tok_dir, folder)


# ------------------------------------------------------------------------------------------ state

@dataclasses.dataclass
class Setup:
  """What a run holds besides the state: static model parts, optimiser, shardings, jitted step."""
  graphdef: object
  rest: object
  tx: object
  lr: object
  mesh: object
  state_sh: sft.TrainState
  abstract: sft.TrainState


def create_state(cfg, model: InternVL, mesh, *, materialise: bool = True, trainable=None):
  """-> (TrainState placed in its shardings, or None when `materialise` is False, and the Setup). `model`
  may be abstract (`nnx.eval_shape`) when the state is about to be restored from a checkpoint. trainable:
  the parts to train (default `cfg.trainable`)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise AssertionError("the model holds non-parameter state; the train state does not carry it yet")
  trainable, frozen = optim.split_trainable(params, tuple(cfg.trainable if trainable is None else trainable),
                                            flash=is_vico(cfg))
  tx, lr = optim.make_optimizer(cfg.optim, cfg.steps)

  def build(trainable, frozen):
    return sft.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                          opt_state=tx.init(trainable), key=jax.random.key_data(jax.random.key(cfg.seed)))

  abstract = jax.eval_shape(build, trainable, frozen)
  state_sh = sft.state_shardings(abstract, mesh, tx)
  setup = Setup(graphdef, rest, tx, lr, mesh, state_sh, abstract)
  return (jax.jit(build, out_shardings=state_sh)(trainable, frozen) if materialise else None), setup


def model_of(state: sft.TrainState, setup: Setup) -> InternVL:
  return nnx.merge(setup.graphdef, state.params, state.frozen, setup.rest)


# ------------------------------------------------------------------------------------------ the run

@dataclasses.dataclass
class Run:
  """What every stage (SFT, MPO, GSPO) sets up the same way before its loop."""
  tok_dir: str
  model_cfg: InternVLConfig
  processor: Processor
  mesh: object
  checkpointer: Checkpointer
  state: object  # sft.TrainState, or (TrainState, extra) for a stage that checkpoints more (MPO's δ)
  setup: Setup
  writer: MetricsWriter
  evaluator: object  # evaluation.Evaluator, or None without eval.meta
  iterator: object  # what make_iterator returned, or None


def prepare(cfg, workdir: str, *, mesh=None, make_iterator=None, extra=None, trainable=None) -> Run:
  """Mesh, tokenizer, processor, model folder, checkpointer, and the train state: fresh from the config's
  model, or restored from the workdir's latest checkpoint (with the state of `make_iterator(processor)`'s data
  iterator). `extra(mesh) -> (value, sharding)`: more state to checkpoint beside the TrainState; `run.state`
  is then (TrainState, value). `mesh`: the config's, when not given. trainable: as in `create_state`."""
  mesh = sharding.make_mesh(dict(cfg.mesh)) if mesh is None else mesh
  tok_dir = tokenizer_dir(cfg)
  tokenizer = Tokenizer.from_pretrained(tok_dir, template=cfg.data.template)
  model_cfg = model_config(cfg, tokenizer)
  processor = make_processor(cfg, model_cfg, tokenizer)
  write_model_folder(os.path.join(workdir, "model"), model_cfg, tok_dir)
  iterator = make_iterator(processor) if make_iterator is not None else None
  checkpointer = Checkpointer(workdir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                              async_save=cfg.checkpoint.async_save)
  latest = checkpointer.latest_step()
  extra = extra(mesh) if extra is not None else None
  if latest is None:
    state, setup = create_state(cfg, initial_model(cfg, model_cfg, mesh), mesh, trainable=trainable)
    if extra is not None:
      state = (state, extra[0])
  else:  # resume: only the abstract state, then the checkpoint is read straight into its shardings
    _, setup = create_state(cfg, nnx.eval_shape(lambda: InternVL(model_cfg, rngs=nnx.Rngs(0))), mesh,
                            materialise=False, trainable=trainable)
    abstract, shardings = setup.abstract, setup.state_sh
    if extra is not None:
      abstract, shardings = (abstract, jax.eval_shape(lambda: extra[0])), (shardings, extra[1])
    state = checkpointer.restore(latest, abstract, shardings, iterator)
    console.info(f"resumed from {workdir}/checkpoints/{latest}")
  local_rows = cfg.batch_size // jax.process_count()
  evaluator = evaluation.Evaluator(cfg, processor, local_rows, mesh) if cfg.eval.meta else None
  writer = MetricsWriter(workdir, total_steps=cfg.steps, tensorboard=cfg.get("tensorboard", True))
  return Run(tok_dir, model_cfg, processor, mesh, checkpointer, state, setup, writer, evaluator, iterator)


class StepLog:
  """The per-step bookkeeping every stage shares: every log_every steps (and the last) metrics.jsonl,
  TensorBoard and the console line, with tokens/s over the steps since the previous line; after each step's
  checkpoint, evaluation every eval.every steps (and the last). `last` holds the latest logged values."""

  def __init__(self, run: Run, cfg):
    self.run, self.cfg, self.last, self.tokens, self.t0 = run, cfg, {}, 0, time.time()

  def step(self, step: int, metrics: dict, tokens: int, extra=None) -> bool:
    """Count `tokens` trained; log when due (metrics plus `extra()`); returns whether it logged."""
    self.tokens += tokens
    if step % self.cfg.log_every and step != self.cfg.steps:
      return False
    self.last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.last.setdefault("lr", float(self.run.setup.lr(step - 1)))
    self.last["tokens_per_s"] = self.tokens / max(time.time() - self.t0, 1e-9)
    self.last.update(extra() if extra is not None else {})
    self.run.writer.write(step, self.last)
    self.run.writer.progress(step, self.last)
    self.reset()
    return True

  def reset(self) -> None:
    self.tokens, self.t0 = 0, time.time()

  def end_of_step(self, step: int, state: sft.TrainState) -> None:
    if self.run.evaluator is None or (step % self.cfg.eval.every and step != self.cfg.steps):
      return
    results = self.run.evaluator.run(model_of(state, self.run.setup), step)
    self.run.writer.write(step, results["metrics"], kind="eval")
    console.info(results["table"])
    self.last.update({f"eval_{k}": v for k, v in results["metrics"].items()})
    self.reset()  # tokens/s measures training only


def finish(cfg, run: Run, state: sft.TrainState, workdir: str) -> None:
  """Wait for checkpoints, export the final weights (one process), close the metrics."""
  run.checkpointer.close()
  if cfg.get("export", "hf") and jax.process_count() > 1:
    logger.warning("export skipped: save_pretrained writes from one process; export the last checkpoint on one host")
  elif cfg.get("export", "hf"):
    export(model_of(state, run.setup), os.path.join(workdir, "export"), run.tok_dir, layout=cfg.export)
  run.writer.close()


def check_rows(mesh, rows: int, what: str, accum_steps: int = 1) -> None:
  """Every device must hold whole rows of each micro-batch: rows a multiple of the batch shards (data x fsdp x
  expert) times accum_steps. `what` names the rows in the error."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if rows % (shards * accum_steps):
    raise ValueError(f"{what} must be a multiple of the batch shards (data x fsdp x expert = {shards}) times "
                     f"accum_steps={accum_steps}, so every device holds whole rows of each micro-batch")


def check_single_process(stage: str) -> None:
  """The RL stages run in one process: their rollouts and reference pass drive one process's devices."""
  if jax.process_count() > 1:
    raise NotImplementedError(f"the {stage} stage runs in one process (its rollouts and reference pass drive one "
                              "process's devices); run it on one host")


def train_sft(cfg, workdir: str) -> dict:
  """Run (or resume) the SFT training described by `cfg` in `workdir` (`cfg.stage` 'sft'; 'mpo' and 'gspo'
  are `rl/mpo.py` and `rl/gspo.py`, `stages.train` picks one). Returns the last train and eval metrics."""
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size={cfg.batch_size} rows do not split over {jax.process_count()} processes")
  local_rows = cfg.batch_size // jax.process_count()
  mesh = sharding.make_mesh(dict(cfg.mesh))
  check_rows(mesh, cfg.batch_size, f"batch_size={cfg.batch_size}", cfg.accum_steps)
  run = prepare(cfg, workdir, mesh=mesh, make_iterator=lambda processor: data_lib.make_iterator(
      cfg.data, processor, batch_size=local_rows, seed=cfg.seed, process_index=jax.process_index(),
      process_count=jax.process_count()))
  state, setup, model_cfg, iterator = run.state, run.setup, run.model_cfg, run.iterator
  step_cfg = sft.StepConfig(accum_steps=cfg.accum_steps, aux_loss_coef=model_cfg.text.router_aux_loss_coef
                            if model_cfg.text.is_moe else 0.0, drop_path=model_cfg.vision.drop_path_rate > 0,
                            loss_chunk=cfg.loss_chunk)
  step_fn = None
  step = int(jax.device_get(state.step))
  log, skipped_seen = StepLog(run, cfg), 0
  while step < cfg.steps:
    local = next(iterator)
    batch = sft.global_batch(local, mesh)
    if step_fn is None:
      step_fn = sft.make_train_step(setup.graphdef, setup.rest, setup.tx, step_cfg, mesh, setup.state_sh,
                                    {k: v.sharding for k, v in batch.items()}, setup.lr)
    state, metrics = step_fn(state, batch)
    step += 1
    tokens = int(np.sum(local["segment_ids"] > 0)) * jax.process_count()
    if log.step(step, metrics, tokens, extra=lambda: {"skipped_samples": iterator.stats()["skipped"]}):
      stats = iterator.stats()
      if stats["skipped"] > skipped_seen:
        console.warning(f"data: {stats['skipped']} samples skipped so far {stats.get('reasons', {})}; e.g. "
                        f"{stats.get('examples', [])[:3]}")
        skipped_seen = stats["skipped"]
    run.checkpointer.save(step, state, iterator, force=step == cfg.steps)
    log.end_of_step(step, state)
  finish(cfg, run, state, workdir)
  return log.last
