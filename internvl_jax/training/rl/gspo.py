"""GSPO, the online stage of Cascade RL (paper §2.3 eq. 4-6, REFERENCE.md §6.5): a pure train step on rollouts,
and the stage as `train.py` runs it (`config.stage = 'gspo'`, `train_gspo`).

Batch contract: `sft`'s keys for B unpacked rows, each a prompt and one sampled response (labels on the
response tokens only, -100 elsewhere), plus `old_logps` [B, L-1] (the rollout policy's log-probs of each next
token, recorded at sampling time, aligned with the shifted labels) and `advantages` [B]
(`losses.group_advantages` over each prompt's G responses). `policy_loss='grpo'` swaps in the token-level
ratio for comparison.

The stage starts from the previous stage's checkpoint (`config.model.checkpoint`, e.g. the MPO run's
`export/`). Each round samples `gspo.group_size` responses to each of `gspo.rollout_prompts` questions (the
training meta's records, last gpt turn = reference) from the current parameters with the inference Engine,
recording the sampling policy's log-probs; scores them (`gspo.rewards`); keeps the prompts whose rollout
accuracy lies in `gspo.accuracy_range` (drawing again, up to `gspo.max_draws` times, until mini_batches x
batch_size prompts are kept); then takes `gspo.mini_batches` optimiser steps of batch_size prompts (x G rows)
each — verl's train_batch_size / ppo_mini_batch_size. Its data is a function of (seed, round, draw) with no
iterator; a resumed run redoes its interrupted round's rollouts. Evaluation, checkpoints, metrics and export
are SFT's (`training/loop.py`). Single-process: generation drives one process's devices.
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
import optax
from flax import nnx

from internvl_jax.data import load_records
from internvl_jax.inference.engine import Engine
from internvl_jax.training import loop
from internvl_jax.training import sft
from internvl_jax.training.rl import losses, rewards as rewards_lib, rollout

BATCH_KEYS = sft.BATCH_KEYS + ("old_logps", "advantages")
POLICY_LOSSES = {"gspo": losses.gspo_loss, "grpo": losses.grpo_loss}


def gspo_step(state: sft.TrainState, batch: dict, *, graphdef, rest, tx: optax.GradientTransformation,
              policy_loss: str = "gspo", eps_low: float = 0.2, eps_high: float = 0.2):
  """One optimiser step on B rollouts. Pure: (state, batch) -> (state, metrics). No reference model and no
  KL term, as InternVL3.5 trains GSPO (`losses.gspo_loss` offers the KL for other recipes)."""
  if policy_loss not in POLICY_LOSSES:
    raise ValueError(f"policy_loss must be one of {sorted(POLICY_LOSSES)}, got {policy_loss!r}")
  batch = {k: batch[k] for k in BATCH_KEYS if k in batch}

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen, rest)
    tok, mask = losses.policy_token_logps(model, batch)
    return POLICY_LOSSES[policy_loss](tok, batch["old_logps"], batch["advantages"], mask, eps_low, eps_high)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return sft.apply_gradients(state, grads, tx), metrics


def make_gspo_step(graphdef, rest, tx, mesh, state_sh, batch_sh, **kw):
  """The jitted step (old state donated), traced under `mesh`; kw: policy_loss, eps_low, eps_high."""
  step = jax.jit(functools.partial(gspo_step, graphdef=graphdef, rest=rest, tx=tx, **kw),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
  return sft.under_mesh(step, mesh)


# ------------------------------------------------------------------------------------------ the stage

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
  """Run (or resume) the GSPO stage described by `cfg` in `workdir` (see the module docstring). Returns the
  last train and eval metrics."""
  loop.check_single_process("gspo")
  g = cfg.gspo
  run = loop.prepare(cfg, workdir)
  state, setup = run.state, run.setup
  loop.check_rows(run.mesh, cfg.batch_size * g.group_size,
                  f"batch_size x gspo.group_size = {cfg.batch_size * g.group_size} rows")
  questions = load_records(cfg.data.meta)
  if not questions:
    raise ValueError(f"config.data.meta={cfg.data.meta}: no question with a reference answer")
  engine = Engine(loop.model_of(state, setup))
  step_fn = None
  step = int(jax.device_get(state.step))
  log = loop.StepLog(run, cfg)
  while step < cfg.steps:
    # One rollout round from the current parameters, then mini_batches optimiser steps on it (the later ones
    # off-policy, where the clipped importance ratio matters). A resumed run restarts its round.
    groups, round_metrics = _rollout_round(cfg, run, engine, loop.model_of(state, setup), questions,
                                           step // g.mini_batches)
    for m in range(g.mini_batches):
      if step >= cfg.steps:
        break
      part = groups[m * cfg.batch_size:(m + 1) * cfg.batch_size]
      local = _gspo_batch(part, cfg, run.processor)
      batch = sft.global_batch(local, run.mesh, BATCH_KEYS)
      if step_fn is None:
        step_fn = make_gspo_step(setup.graphdef, setup.rest, setup.tx, run.mesh, setup.state_sh,
                                 {k: v.sharding for k, v in batch.items()}, policy_loss=g.policy_loss,
                                 eps_low=g.eps_low, eps_high=g.eps_high)
      state, metrics = step_fn(state, batch)
      step += 1
      log.step(step, dict(metrics, **round_metrics), int(np.sum(local["segment_ids"] > 0)))
      run.checkpointer.save(step, state, None, force=step == cfg.steps)
      log.end_of_step(step, state)
  loop.finish(cfg, run, state, workdir)
  return log.last


def _gspo_batch(groups, cfg, processor) -> dict:
  """[(rollouts, prompt index, advantages [P, G])] -> one gspo_step batch of their len(groups) x G rows."""
  parts = [rollout.gspo_batch(rolls, [i], adv, max_tokens=cfg.data.max_tokens, max_tiles=cfg.data.max_tiles_per_row,
                              pad_id=processor.tokenizer.pad_id, tile_size=processor.tile_size)
           for rolls, i, adv in groups]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
