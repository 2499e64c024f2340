"""Drawing the next token: greedy or sampled with temperature, top-k, top-p and a repetition penalty, per
row; and the log-prob of a drawn token under the model's untempered distribution (what RL records)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Per-request sampling settings. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0


def token_logp(logits, tokens):
  """log π(token) under the model's own distribution (no temperature, filter or penalty): logits [b, V]
  float32, tokens [b] -> [b]. What RL records as the rollout policy's log-probs, so that they match the
  train step's log-softmax of the same logits."""
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


def sample(logits, key, seen, temperature, top_k, top_p, penalty):
  """logits [b, V] float32; per-row settings [b]; seen [b, V] tokens already in the sequence. key: one PRNG
  key for the whole batch, or one per row ([b]), so that a row's draw depends on its own key alone (what a
  server's per-request seed needs: the same answer whatever else shares the batch).

  The sorts that top-k / top-p need over the whole vocabulary cost more than a decode step's matmuls on
  a CPU, so they run (lax.cond) only when some row samples with such a filter; greedy rows take argmax.
  """
  logits = jax.lax.cond(jnp.any(penalty != 1.0), lambda x: jnp.where(
      seen & (penalty[:, None] != 1.0), jnp.where(x > 0, x / penalty[:, None], x * penalty[:, None]), x),
                        lambda x: x, logits)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def filtered(scaled):
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
    scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p, and at least the top
    # token (top_p 0 included, as transformers' min_tokens_to_keep=1). Tokens tied with the last one kept stay
    # too, as at the top-k cutoff, so the result does not depend on token ids (transformers keeps only the tied
    # tokens its sort order reaches)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p[:, None], ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < jnp.minimum(cutoff, ordered[:, :1]), -jnp.inf, scaled)

  def sampled(x):
    scaled = x / jnp.maximum(temperature, 1e-6)[:, None]
    scaled = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), filtered, lambda y: y, scaled)
    if key.ndim == 0:
      drawn = jax.random.categorical(key, scaled, axis=-1)
    else:
      drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled)
    drawn = drawn.astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda x: greedy, logits)


def settings_arrays(samplings: list[Sampling], batch: int):
  pad = samplings + [Sampling()] * (batch - len(samplings))
  return (jnp.asarray([s.temperature for s in pad], jnp.float32), jnp.asarray([s.top_k for s in pad], jnp.int32),
          jnp.asarray([s.top_p for s in pad], jnp.float32),
          jnp.asarray([s.repetition_penalty for s in pad], jnp.float32))
