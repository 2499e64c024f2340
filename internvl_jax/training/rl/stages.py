"""The two Cascade RL stages as `train.py` runs (`config.stage = 'mpo' | 'gspo'`), each starting from the
previous stage's checkpoint (`config.model.checkpoint`, e.g. the SFT run's `export/`).

* MPO (offline): preference pairs from `config.data.meta` (MMPR-style JSONL, `rl/pairs.py`), `batch_size`
  pairs per step (2 x batch_size rows, chosen then rejected), reference log-probs from a frozen copy of the
  starting model computed once per batch outside the gradient, the BCO shift δ checkpointed with the state.
* GSPO (online): each round samples `gspo.group_size` responses to each of `gspo.rollout_prompts` questions
  (the training meta's records, last gpt turn = reference) from the current parameters with the inference
  Engine, recording the sampling policy's log-probs; scores them (`gspo.rewards`); keeps the prompts whose
  rollout accuracy lies in `gspo.accuracy_range` (drawing again, up to `gspo.max_draws` times, until
  mini_batches x batch_size prompts are kept); then takes `gspo.mini_batches` optimiser steps of batch_size
  prompts (x G rows) each — verl's train_batch_size / ppo_mini_batch_size.

Both draw their data from (seed, position) with no iterator: MPO's pair j is a function of j, and its
position and count of skipped pairs are checkpointed as the data state (skipped pairs move the position off
step x batch_size), so a resumed MPO run repeats the uninterrupted one exactly (BCO shift included); a resumed
GSPO run redoes its interrupted round's rollouts. Evaluation, checkpoints, metrics and export are SFT's
(`trainer.py`). Single-process: generation drives one process's devices.
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
from flax import nnx

from internvl_jax.training import sft
from internvl_jax.training import loop as trainer
from internvl_jax.data import load_records, samples
from internvl_jax.inference.engine import Engine
from internvl_jax.training.rl import gspo as gspo_lib
from internvl_jax.training.rl import losses, mpo as mpo_lib, pairs as pairs_lib, rewards as rewards_lib, rollout


def _single_process(stage: str) -> None:
  if jax.process_count() > 1:
    raise NotImplementedError(f"the {stage} stage runs in one process (its rollouts and reference pass drive one "
                              "process's devices); run it on one host")


def train_mpo(cfg, workdir: str) -> dict:
  _single_process("mpo")

  def bco_state(mesh):
    replicated = jax.NamedSharding(mesh, jax.P())
    return losses.bco_init(), losses.BCOState(replicated, replicated)

  cursor = _PairCursor()
  run = trainer.prepare(cfg, workdir, extra=bco_state, make_iterator=lambda processor: cursor)
  (state, bco), setup = run.state, run.setup
  trainer.check_rows(run.mesh, 2 * cfg.batch_size, f"2 x batch_size = {2 * cfg.batch_size} rows (chosen, rejected)")
  pairs, skipped = pairs_lib.load_pairs(cfg.data.meta)
  if skipped:
    print(f"mpo data: skipped {sum(map(len, skipped.values()))} lines {({k: len(v) for k, v in skipped.items()})}; "
          f"e.g. {[v[0] for v in skipped.values()]}", flush=True)
  if not pairs:
    raise ValueError(f"config.data.meta={cfg.data.meta}: no valid preference pair")
  # The reference: a frozen copy of the starting model (the stage's checkpoint), also after a resume.
  _, ref_params, _ = nnx.split(trainer.initial_model(cfg, run.model_cfg, run.mesh), nnx.Param, ...)
  step_fn = ref_fn = None
  pad_id = run.processor.tokenizer.pad_id
  step = int(jax.device_get(state.step))
  if cursor.next is None:  # a fresh run, or a checkpoint written before the cursor was saved
    cursor.next = step * cfg.batch_size
  log = trainer.StepLog(run, cfg)
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
        print(f"mpo data: skipped {pair['where']}: {e.reason}: {e}", flush=True)
    local = pairs_lib.mpo_batch(rows, max_tokens=cfg.data.max_tokens, max_tiles=cfg.data.max_tiles_per_row,
                                pad_id=pad_id, tile_size=run.processor.tile_size)
    batch = sft.global_batch(local, run.mesh)
    if step_fn is None:
      batch_sh = {k: v.sharding for k, v in batch.items()}
      batch_sh.update(sft.batch_sharding(run.mesh, {"ref_logps": jax.ShapeDtypeStruct((2 * cfg.batch_size,),
                                                                                       np.float32)}))
      step_fn, ref_fn = mpo_lib.make_mpo_step(setup.graphdef, setup.rest, setup.tx, run.mesh, setup.state_sh,
                                              batch_sh, beta=cfg.mpo.beta, weights=tuple(cfg.mpo.weights))
    batch["ref_logps"] = ref_fn(ref_params, batch)
    state, bco, metrics = step_fn(state, bco, batch)
    step += 1
    log.step(step, dict(metrics, skipped_pairs=cursor.skipped), int(np.sum(local["segment_ids"] > 0)))
    run.checkpointer.save(step, (state, bco), cursor, force=step == cfg.steps)
    log.end_of_step(step, state)
  trainer.finish(cfg, run, state, workdir)
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


def _rollout_round(cfg, run, engine, model, questions, round_index: int):
  """Rollouts from `model` until mini_batches x batch_size prompts pass the accuracy filter (or max_draws
  draws are spent; the rest is then filled with prompts outside the range, in draw order, each with its own
  group advantages: 0 where its rewards are all equal, as every response right or every one wrong; not 0 for
  e.g. 1 right of G = 8 under [0.2, 0.8]). -> ([(rollouts, prompt index, advantages [P, G])], statistics)."""
  g = cfg.gspo
  need = g.mini_batches * cfg.batch_size
  kept, spare = [], []
  stats = {"rollouts": 0, "correct": 0.0, "truncated": 0, "tokens": 0.0, "draws": 0, "t0": time.time()}
  for draw in range(g.max_draws):
    rng = np.random.default_rng((cfg.seed, round_index, draw))
    picked = [questions[i] for i in rng.choice(len(questions), size=min(g.rollout_prompts, len(questions)),
                                               replace=False)]
    rolls = rollout.sample(model, engine, run.processor, picked, group_size=g.group_size,
                           max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                           seed=int(rng.integers(2**31)), max_rows=g.max_rows)
    total, correct = rolls.score(dict(g.rewards)), rolls.score({"accuracy": 1.0})
    keep = set(rewards_lib.select_prompts(correct, *g.accuracy_range)[0].tolist())
    adv = np.asarray(losses.group_advantages(total))
    kept += [(rolls, i, adv) for i in sorted(keep)]
    spare += [(rolls, i, adv) for i in range(len(picked)) if i not in keep]
    stats.update(rollouts=stats["rollouts"] + correct.size, correct=stats["correct"] + float(correct.sum()),
                 truncated=stats["truncated"] + int(rolls.truncated.sum()),
                 tokens=stats["tokens"] + float(rolls.lengths.sum()), draws=draw + 1)
    if len(kept) >= need:
      break
  metrics = {"rollout_accuracy": stats["correct"] / stats["rollouts"], "kept_prompts": min(len(kept), need),
             "draws": stats["draws"], "response_tokens": stats["tokens"] / stats["rollouts"],
             "truncated": stats["truncated"] / stats["rollouts"], "rollout_seconds": time.time() - stats["t0"]}
  return (kept + spare)[:need], metrics


def train_gspo(cfg, workdir: str) -> dict:
  _single_process("gspo")
  g = cfg.gspo
  run = trainer.prepare(cfg, workdir)
  state, setup = run.state, run.setup
  trainer.check_rows(run.mesh, cfg.batch_size * g.group_size,
                     f"batch_size x gspo.group_size = {cfg.batch_size * g.group_size} rows")
  questions = load_records(cfg.data.meta)
  if not questions:
    raise ValueError(f"config.data.meta={cfg.data.meta}: no question with a reference answer")
  engine = Engine(trainer.model_of(state, setup))
  step_fn = None
  step = int(jax.device_get(state.step))
  log = trainer.StepLog(run, cfg)
  while step < cfg.steps:
    # One rollout round from the current parameters, then mini_batches optimiser steps on it (the later ones
    # off-policy, where the clipped importance ratio matters). A resumed run restarts its round.
    groups, round_metrics = _rollout_round(cfg, run, engine, trainer.model_of(state, setup), questions,
                                           step // g.mini_batches)
    for m in range(g.mini_batches):
      if step >= cfg.steps:
        break
      part = groups[m * cfg.batch_size:(m + 1) * cfg.batch_size]
      local = _gspo_batch(part, cfg, run.processor)
      batch = sft.global_batch(local, run.mesh, gspo_lib.BATCH_KEYS)
      if step_fn is None:
        step_fn = gspo_lib.make_gspo_step(setup.graphdef, setup.rest, setup.tx, run.mesh, setup.state_sh,
                                          {k: v.sharding for k, v in batch.items()}, policy_loss=g.policy_loss,
                                          eps_low=g.eps_low, eps_high=g.eps_high)
      state, metrics = step_fn(state, batch)
      step += 1
      log.step(step, dict(metrics, **round_metrics), int(np.sum(local["segment_ids"] > 0)))
      run.checkpointer.save(step, state, None, force=step == cfg.steps)
      log.end_of_step(step, state)
  trainer.finish(cfg, run, state, workdir)
  return log.last


def _gspo_batch(groups, cfg, processor) -> dict:
  """[(rollouts, prompt index, advantages [P, G])] -> one gspo_step batch of their len(groups) x G rows."""
  parts = [rollout.gspo_batch(rolls, [i], adv, max_tokens=cfg.data.max_tokens, max_tiles=cfg.data.max_tiles_per_row,
                              pad_id=processor.tokenizer.pad_id, tile_size=processor.tile_size)
           for rolls, i, adv in groups]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


STAGES = {"mpo": train_mpo, "gspo": train_gspo}
