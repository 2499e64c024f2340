"""MPO, the offline stage of Cascade RL (paper §2.3, REFERENCE.md §6.4): a pure train step on preference pairs.

Batch contract: `sft`'s keys for 2P unpacked rows, the P chosen replies first and then the P rejected ones
(pair i is rows i and P + i, same prompt and images), labels (-100 = ignored) on the reply tokens only, plus
`ref_logps` [2P]: the frozen reference model's sequence log-probs of the same rows (`reference_logps`, computed
once per batch outside the gradient, or read from precomputed files). Chosen and rejected run as one batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from internvl_jax.training import sft
from internvl_jax.inputs.processor import IGNORE
from internvl_jax.training.rl import losses

BATCH_KEYS = sft.BATCH_KEYS + ("ref_logps",)


def token_logps(logits, labels):
  """logits [B, L, V], labels [B, L] (unshifted, -100 ignored) -> (log p of each next token [B, L-1] float32,
  reply mask [B, L-1])."""
  targets = labels[:, 1:]
  mask = targets != IGNORE
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0], mask


def policy_token_logps(model, batch):
  logits = model(batch["input_ids"], batch.get("pixel_values"), position_ids=batch["position_ids"],
                 segment_ids=batch["segment_ids"])
  return token_logps(logits, batch["labels"])


def reference_logps(model, batch):
  """The reference model's sequence log-probs [B] (no gradient flows to it)."""
  return jax.lax.stop_gradient(losses.sequence_logps(*policy_token_logps(model, batch)))


def mpo_step(state: sft.TrainState, bco: losses.BCOState, batch: dict, *, graphdef, rest,
             tx: optax.GradientTransformation, beta: float = 0.1, weights=losses.MPO_WEIGHTS):
  """One optimiser step on 2P rows. Pure: (state, bco, batch) -> (state, bco, metrics)."""
  batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
  pairs = batch["input_ids"].shape[0] // 2
  ref = batch["ref_logps"]

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen, rest)
    tok, mask = policy_token_logps(model, batch)
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
