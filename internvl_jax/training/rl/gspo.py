"""GSPO, the online stage of Cascade RL (paper §2.3 eq. 4-6, REFERENCE.md §6.5): a pure train step on rollouts.

Batch contract: `sft`'s keys for B unpacked rows, each a prompt and one sampled response (labels on the
response tokens only, -100 elsewhere), plus `old_logps` [B, L-1] (the rollout policy's log-probs of each next
token, recorded at sampling time, aligned with the shifted labels) and `advantages` [B]
(`losses.group_advantages` over each prompt's G responses). `policy_loss='grpo'` swaps in the token-level
ratio for comparison.
"""
from __future__ import annotations

import functools

import jax
import optax
from flax import nnx

from internvl_jax.training import sft
from internvl_jax.training.rl import losses
from internvl_jax.training.rl.mpo import policy_token_logps

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
    tok, mask = policy_token_logps(model, batch)
    return POLICY_LOSSES[policy_loss](tok, batch["old_logps"], batch["advantages"], mask, eps_low, eps_high)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return sft.apply_gradients(state, grads, tx), metrics


def make_gspo_step(graphdef, rest, tx, mesh, state_sh, batch_sh, **kw):
  """The jitted step (old state donated), traced under `mesh`; kw: policy_loss, eps_low, eps_high."""
  step = jax.jit(functools.partial(gspo_step, graphdef=graphdef, rest=rest, tx=tx, **kw),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
  return sft.under_mesh(step, mesh)
