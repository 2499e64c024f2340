"""MPO, the offline stage of Cascade RL (paper §2.3, REFERENCE.md §6.4): a pure train step on preference pairs,
and the stage as `train.py` runs it (`config.stage = 'mpo'`, `train_mpo`).

Batch contract: `sft`'s keys for 2P unpacked rows, the P chosen replies first and then the P rejected ones
(pair i is rows i and P + i, same prompt and images), labels (-100 = ignored) on the reply tokens only, plus
`ref_logps` [2P]: the frozen reference model's sequence log-probs of the same rows (`reference_logps`, computed
once per batch outside the gradient, or read from precomputed files). Chosen and rejected run as one batch.

The stage starts from the previous stage's checkpoint (`config.model.checkpoint`, e.g. the SFT run's
`export/`): preference pairs from `config.data.meta` (MMPR-style JSONL, `rl/pairs.py`), `batch_size` pairs per
step (2 x batch_size rows, chosen then rejected), reference log-probs from a frozen copy of the starting model
computed once per batch outside the gradient, the BCO shift δ checkpointed with the state. Its data is drawn
from (seed, position) with no iterator: pair j is a function of j, and its position and count of skipped
pairs are checkpointed as the data state (skipped pairs move the position off step x batch_size), so a
resumed run repeats the uninterrupted one exactly (BCO shift included). Evaluation, checkpoints, metrics and
export are SFT's (`training/loop.py`). Single-process: the reference pass drives one process's devices.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx

from internvl_jax.data import samples
from internvl_jax.training import loop
from internvl_jax.training import sft
from internvl_jax.training.metrics import console
from internvl_jax.training.rl import losses, pairs as pairs_lib

BATCH_KEYS = sft.BATCH_KEYS + ("ref_logps",)


def reference_logps(model, batch):
  """The reference model's sequence log-probs [B] (no gradient flows to it)."""
  return jax.lax.stop_gradient(losses.sequence_logps(*losses.policy_token_logps(model, batch)))


def mpo_step(state: sft.TrainState, bco: losses.BCOState, batch: dict, *, graphdef, rest,
             tx: optax.GradientTransformation, beta: float = 0.1, weights=losses.MPO_WEIGHTS):
  """One optimiser step on 2P rows. Pure: (state, bco, batch) -> (state, bco, metrics)."""
  batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
  pairs = batch["input_ids"].shape[0] // 2
  ref = batch["ref_logps"]

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen, rest)
    tok, mask = losses.policy_token_logps(model, batch)
    return losses.mpo_loss(tok[:pairs], tok[pairs:], mask[:pairs], mask[pairs:], ref[:pairs], ref[pairs:], bco,
                           beta=beta, weights=weights)

  (loss, (metrics, bco)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return sft.apply_gradients(state, grads, tx), bco, metrics


def make_mpo_step(graphdef, rest, tx, mesh, state_sh, batch_sh, *, beta: float = 0.1, weights=losses.MPO_WEIGHTS):
  """The jitted step (old state donated) and the jitted reference log-probs, both traced under `mesh`."""
  replicated = jax.NamedSharding(mesh, jax.P())
  step = jax.jit(functools.partial(mpo_step, graphdef=graphdef, rest=rest, tx=tx, beta=beta, weights=weights),
                 in_shardings=(state_sh, replicated, batch_sh), out_shardings=(state_sh, replicated, None),
                 donate_argnums=0)
  ref = jax.jit(lambda params, batch: reference_logps(nnx.merge(graphdef, params, rest), batch))
  return sft.under_mesh(step, mesh), sft.under_mesh(ref, mesh)


# ------------------------------------------------------------------------------------------ the stage

def train_mpo(cfg, workdir: str) -> dict:
  """Run (or resume) the MPO stage described by `cfg` in `workdir` (see the module docstring). Returns the last
  train and eval metrics."""
  loop.check_single_process("mpo")

  def bco_state(mesh):
    replicated = jax.NamedSharding(mesh, jax.P())
    return losses.bco_init(), losses.BCOState(replicated, replicated)

  cursor = _PairCursor()
  run = loop.prepare(cfg, workdir, extra=bco_state, make_iterator=lambda processor: cursor)
  (state, bco), setup = run.state, run.setup
  loop.check_rows(run.mesh, 2 * cfg.batch_size, f"2 x batch_size = {2 * cfg.batch_size} rows (chosen, rejected)")
  pairs, skipped = pairs_lib.load_pairs(cfg.data.meta)
  if skipped:
    console.warning(f"mpo data: skipped {sum(map(len, skipped.values()))} lines "
                    f"{({k: len(v) for k, v in skipped.items()})}; e.g. {[v[0] for v in skipped.values()]}")
  if not pairs:
    raise ValueError(f"config.data.meta={cfg.data.meta}: no valid preference pair")
  # The reference: a frozen copy of the starting model (the stage's checkpoint), also after a resume.
  _, ref_params, _ = nnx.split(loop.initial_model(cfg, run.model_cfg, run.mesh), nnx.Param, ...)
  step_fn = ref_fn = None
  pad_id = run.processor.tokenizer.pad_id
  step = int(jax.device_get(state.step))
  if cursor.next is None:  # a fresh run, or a checkpoint written before the cursor was saved
    cursor.next = step * cfg.batch_size
  log = loop.StepLog(run, cfg)
  epoch_order = functools.lru_cache(maxsize=2)(
      lambda epoch: np.random.default_rng((cfg.seed, epoch)).permutation(len(pairs)))
  order = lambda j: epoch_order(j // len(pairs))[j % len(pairs)]  # pair j of the run: a function of j only
  while step < cfg.steps:
    rows = []
    while len(rows) < cfg.batch_size:  # a pair that cannot be made is skipped, counted and reported
      pair = pairs[order(cursor.next)]
      cursor.next += 1
      try:
        rows.append(pairs_lib.pair_samples(pair, processor=run.processor, max_tokens=cfg.data.max_tokens,
                                           max_tiles=cfg.data.max_tiles_per_row))
      except samples.SampleError as e:
        cursor.skipped += 1
        console.warning(f"mpo data: skipped {pair['where']}: {e.reason}: {e}")
    local = pairs_lib.mpo_batch(rows, max_tokens=cfg.data.max_tokens, max_tiles=cfg.data.max_tiles_per_row,
                                pad_id=pad_id, tile_size=run.processor.tile_size)
    batch = sft.global_batch(local, run.mesh)
    if step_fn is None:
      batch_sh = {k: v.sharding for k, v in batch.items()}
      batch_sh.update(sft.batch_sharding(run.mesh, {"ref_logps": jax.ShapeDtypeStruct((2 * cfg.batch_size,),
                                                                                       np.float32)}))
      step_fn, ref_fn = make_mpo_step(setup.graphdef, setup.rest, setup.tx, run.mesh, setup.state_sh, batch_sh,
                                      beta=cfg.mpo.beta, weights=tuple(cfg.mpo.weights))
    batch["ref_logps"] = ref_fn(ref_params, batch)
    state, bco, metrics = step_fn(state, bco, batch)
    step += 1
    log.step(step, dict(metrics, skipped_pairs=cursor.skipped), int(np.sum(local["segment_ids"] > 0)))
    run.checkpointer.save(step, (state, bco), cursor, force=step == cfg.steps)
    log.end_of_step(step, state)
  loop.finish(cfg, run, state, workdir)
  return log.last


class _PairCursor:
  """The MPO stage's position in its pair order and its count of skipped pairs, checkpointed as the data
  iterator's state: once a pair has been skipped the position is no longer step x batch_size, so a resumed run
  could not recompute it without making every earlier row again."""

  def __init__(self):
    self.next, self.skipped = None, 0

  def get_state(self) -> dict:
    return {"next": self.next, "skipped": self.skipped}

  def set_state(self, state: dict) -> None:
    self.next, self.skipped = state.get("next"), state.get("skipped", 0)
