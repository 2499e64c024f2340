"""Supervised fine-tuning (and pre-training): the square-averaged next-token loss and the pure train step.

Square averaging (REFERENCE.md §6.1, paper §2.2): a sample with N supervised tokens weighs each of them
1/sqrt(N) (the data pipeline writes these `loss_weights`), and the loss is

    L = sum_tokens CE * w / sum_tokens w        over the whole global batch (every host, every micro-batch),

plus `router_aux_loss_coef` times the MoE load-balancing loss. `train_step(state, batch) -> (state, metrics)`
is a pure function of arrays; `make_train_step` jits it with explicit shardings over the Mesh.

Batch contract (all [B, L] unless noted; labels are not shifted, the step shifts them):
  input_ids, labels (-100 = ignored), segment_ids (1, 2, ... per packed sample, 0 = padding), position_ids
  (restart at 0 per sample) int32; loss_weights float32; optional pixel_values [B, R, H, W, 3] (each row's
  tiles, then zero tiles) — see `internvl_jax/data`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from internvl_jax import sharding
from internvl_jax.model.layers import dense
from internvl_jax.inputs.labels import IGNORE

BATCH_KEYS = ("input_ids", "labels", "loss_weights", "segment_ids", "position_ids", "pixel_values")


def weighted_next_token_ce(logits, labels, weights):
  """Shifted cross entropy. logits [B, L, V]; labels [B, L] (-100 ignored); weights [B, L].
  -> (sum of CE * w, sum of w, number of supervised tokens), float32 scalars."""
  targets, w = labels[:, 1:], weights[:, 1:].astype(jnp.float32)
  valid = targets != IGNORE
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                       jnp.where(valid, targets, 0))
  w = jnp.where(valid, w, 0.0)
  return jnp.sum(ce * w), jnp.sum(w), jnp.sum(valid).astype(jnp.float32)


def chunked_next_token_ce(hidden, head, labels, weights, chunk: int):
  """`weighted_next_token_ce` from the final hidden states [B, L, D] and the head [D, V], `chunk` positions at
  a time under remat: the [B, L, V] logits never exist at once (at 32K tokens x 151,936 vocab they would
  take 19.9 GB per row in float32); each chunk's logits are recomputed in the backward pass."""
  b, length, d = hidden.shape
  h, targets, w = hidden[:, :-1], labels[:, 1:], weights[:, 1:].astype(jnp.float32)
  n = -(-(length - 1) // chunk)
  pad = n * chunk - (length - 1)
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, n, chunk).swapaxes(0, 1)
  w = jnp.pad(w, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def piece(h_c, t_c, w_c):
    logits = dense("bcd,dv->bcv", h_c, head).astype(jnp.float32)
    valid = t_c != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, t_c, 0))
    w_c = jnp.where(valid, w_c, 0.0)
    return jnp.stack([jnp.sum(ce * w_c), jnp.sum(w_c), jnp.sum(valid).astype(jnp.float32)])

  sums = jax.lax.map(lambda xs: piece(*xs), (h, targets, w))
  return sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 2].sum()


def next_token_terms(model, batch: dict, *, loss_chunk: int = 0, rngs=None):
  """The model on a batch -> ((sum of CE * w, sum of w, supervised tokens), MoE aux loss)."""
  out = model(batch["input_ids"], batch.get("pixel_values"), position_ids=batch["position_ids"],
              segment_ids=batch["segment_ids"], rngs=rngs)
  if loss_chunk:  # the full logits are then never computed (dead code under jit)
    terms = chunked_next_token_ce(out.hidden, model.language_model.head(), batch["labels"], batch["loss_weights"],
                                  loss_chunk)
  else:
    terms = weighted_next_token_ce(out.logits, batch["labels"], batch["loss_weights"])
  return terms, out.moe_aux_loss


@struct.dataclass
class TrainState:
  """Everything a step changes, as a pytree: the trainable parameters, the frozen ones (kept apart so that
  no gradient or optimiser state exists for them), the optimiser state, the step and the dropout key."""
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  accum_steps: int = 1  # micro-batches per step; the loss is still normalised by the whole batch's weights
  aux_loss_coef: float = 0.0  # MoE load-balancing coefficient (the model config's router_aux_loss_coef)
  drop_path: bool = False  # sample drop-path masks (the ViT's drop_path_rate)
  loss_chunk: int = 0  # > 0: compute the loss this many positions at a time (long packed rows)


def _micro_batches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B / accum, ...] taking rows j, j + accum, ... for micro-batch j, so each device
  keeps contributing its own rows to every micro-batch (no resharding of a batch-sharded input)."""
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into accum_steps={accum} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, graphdef, rest, tx: optax.GradientTransformation,
               cfg: StepConfig, lr_schedule=None):
  """One optimiser step on a global batch. Pure: (state, batch) -> (state, metrics)."""
  batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
  weight_sum = jnp.maximum(jnp.sum(jnp.where(batch["labels"][:, 1:] != IGNORE, batch["loss_weights"][:, 1:], 0.0)),
                           1e-6)
  key = jax.random.fold_in(state.key, state.step)

  def loss_fn(params, micro, index):
    model = nnx.merge(graphdef, params, state.frozen, rest)
    rngs = nnx.Rngs(dropout=jax.random.fold_in(key, index)) if cfg.drop_path else None
    (ce_sum, _, n), aux = next_token_terms(model, micro, loss_chunk=cfg.loss_chunk, rngs=rngs)
    aux_loss = aux / cfg.accum_steps
    return ce_sum / weight_sum + cfg.aux_loss_coef * aux_loss, (ce_sum, n, aux_loss)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if cfg.accum_steps == 1:
    (loss, (ce_sum, n, aux)), grads = grad_fn(state.params, batch, 0)
  else:
    def body(carry, xs):
      micro, index = xs
      (l, (c, k, a)), g = grad_fn(state.params, micro, index)
      acc_g, acc = carry
      return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc, (l, c, k, a))), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, tuple(jnp.zeros((), jnp.float32) for _ in range(4)))
    (grads, (loss, ce_sum, n, aux)), _ = jax.lax.scan(
        body, init, (_micro_batches(batch, cfg.accum_steps), jnp.arange(cfg.accum_steps)))
  metrics = {"loss": loss, "ce": ce_sum / weight_sum, "moe_aux_loss": aux, "grad_norm": optax.tree.norm(grads),
             "supervised_tokens": n, "weight_sum": weight_sum}
  if lr_schedule is not None:
    metrics["lr"] = lr_schedule(state.step)
  return apply_gradients(state, grads, tx), metrics


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
  """The optimiser update of the trainable parameters, and the step count."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


# ------------------------------------------------------------------------------------------ sharding

def batch_sharding(mesh, example: dict) -> dict:
  """Rows over the batch mesh axes (data, fsdp, expert), everything else whole."""
  return {k: jax.NamedSharding(mesh, sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1), v.shape, mesh))
          for k, v in example.items()}


def global_batch(local: dict, mesh, keys=BATCH_KEYS) -> dict:
  """Host-local rows -> global arrays sharded over the batch axes: each process supplies its own rows, the
  global batch is their concatenation in process order. Only `keys` are kept."""
  n = jax.process_count()
  local = {k: v for k, v in local.items() if k in keys}
  shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), v.dtype) for k, v in local.items()}
  shardings = batch_sharding(mesh, shapes)
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def state_shardings(abstract: TrainState, mesh, tx) -> TrainState:
  """Parameters by their logical axes; Adam moments like their parameters; scalars replicated."""
  params = sharding.state_shardings(abstract.params, mesh)
  frozen = sharding.state_shardings(abstract.frozen, mesh)
  replicated = jax.NamedSharding(mesh, jax.P())
  is_var = lambda x: isinstance(x, nnx.Variable)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                              transform_non_params=lambda _: replicated, is_leaf=is_var)
  return TrainState(step=replicated, params=params, frozen=frozen, opt_state=opt, key=replicated)


def make_train_step(graphdef, rest, tx, cfg: StepConfig, mesh, state_sh, batch_sh, lr_schedule=None):
  """The jitted step, donating the old state, with activations constrained under `mesh`."""
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, cfg=cfg, lr_schedule=lr_schedule),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)

  return under_mesh(step, mesh)


def under_mesh(fn, mesh):
  """fn called with `mesh` set, so a jitted step is traced under it and the model's activation constraints
  apply."""
  def run(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return run
