"""Cascade RL objectives (paper §2.3, REFERENCE.md §6.4-6.5): MPO for the offline stage, GSPO (and token-level
GRPO) for the online stage, and the per-token log-probs both steps take from the policy. Pure functions of
arrays (`policy_token_logps`: of a model and a batch); all state (the BCO reward shift δ) is passed in and
returned, so every function here can sit inside a jitted, sharded train step.

Shapes: B = preference pairs (MPO) or sampled responses (GSPO/GRPO), T = completion positions.
  token_logps [B, T]  log π(y_t | x, y_<t) of the completion tokens, gathered from the logits by
                      `token_logps` (the one per-token log-prob helper of the MPO and GSPO steps).
  mask        [B, T]  1 on completion tokens, 0 on prompt and padding (bool or number).
Everything is computed in float32 whatever the input dtype: log-prob sums over 32K-token replies lose the
per-token signal in bfloat16.

Sources of truth: MPO follows TRL 0.21 `DPOTrainer.dpo_loss` (the version InternVL3.5 pins) with
loss_type ['sigmoid', 'bco_pair', 'sft'] and weights [0.8, 0.2, 1.0]; GSPO follows verl-internvl
`compute_policy_loss_gspo` with "seq-mean-token-mean" aggregation, which gives the same values and gradients as
TRL's GRPOTrainer with importance_sampling_level="sequence" and loss_type="grpo" (tests/test_rl_losses.py).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from internvl_jax.inputs.labels import IGNORE

MPO_WEIGHTS = (0.8, 0.2, 1.0)  # sigmoid (preference), bco_pair (quality), sft (generation): IVL/oss MPO script
AGG_MODES = ("seq-mean-token-mean", "token-mean")
_GSPO_MAX_LOG_RATIO = 10.0  # verl caps exp() of the sequence log-ratio; only a diverged policy reaches it
_GRPO_LOG_RATIO_CLAMP = 20.0  # verl's token-level cap, same purpose


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _fmask(mask):
  return jnp.asarray(mask).astype(bool).astype(jnp.float32)


def token_logps(logits, labels):
  """logits [B, L, V], labels [B, L] (unshifted, -100 ignored) -> (log p of each next token [B, L-1] float32,
  reply mask [B, L-1])."""
  targets = labels[:, 1:]
  mask = targets != IGNORE
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0], mask


def policy_token_logps(model, batch):
  """`token_logps` of the model's forward on a batch (`sft`'s keys; labels on the reply tokens only)."""
  out = model(batch["input_ids"], batch.get("pixel_values"), position_ids=batch["position_ids"],
              segment_ids=batch["segment_ids"])
  return token_logps(out.logits, batch["labels"])


def sequence_logps(token_logps, mask):
  """log π(y | x) per sequence: [B, T], [B, T] -> [B], the sum over completion tokens.

  `where`, not a product, so a non-finite value at a padded position (e.g. -inf from a masked vocab) stays out
  of both the sum and its gradient."""
  return jnp.sum(jnp.where(jnp.asarray(mask).astype(bool), _f32(token_logps), 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------------------
# MPO (offline RL): L = w_p·L_sigmoid + w_q·L_bco_pair + w_g·L_sft.  All *_chosen / *_rejected below are [B]
# sequence log-probs (`sequence_logps`); ref_* come from the frozen reference model and get no gradient.


class BCOState(NamedTuple):
  """Running mean δ of the bco_pair reward shift (the mean half of TRL's `RunningMoments`; δ never uses the
  variance). Both fields are float32 scalars; start from `bco_init()`."""
  mean: jax.Array  # δ
  count: jax.Array  # batches folded in so far


def bco_init() -> BCOState:
  # TRL starts from count 1e-24, not 0: the first update then divides by ~1 and δ becomes that batch's mean.
  return BCOState(jnp.zeros((), jnp.float32), jnp.full((), 1e-24, jnp.float32))


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
  """Preference loss, [B] x4 -> scalar: mean −log σ(β[(log π_c − log π_r) − (log ref_c − log ref_r)]).
  Label smoothing is 0 in InternVL3.5, so it is not offered."""
  logits = (_f32(policy_chosen) - _f32(policy_rejected)) - (_f32(ref_chosen) - _f32(ref_rejected))
  return jnp.mean(-jax.nn.log_sigmoid(beta * logits))


def bco_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, state, beta=0.1):
  """Quality loss, [B] x4 + state -> (scalar, new state):
      r_c = β(log π_c − log ref_c),  r_r = β(log π_r − log ref_r)
      loss = mean[−log σ(r_c − δ) − log σ(−(r_r − δ))]
  δ is the running mean of the per-batch scalar mean(cat(r_c, r_r)), updated with this batch *before* it is
  used, as TRL 0.21 does. TRL folds one scalar per rank per step (count += world size) into the mean of the
  rank means; with equal per-rank batches that is the same δ as folding the global batch mean once, which is
  what a jitted global batch here does.

  state=None gives δ ≡ 0 and returns None as the state: the `bco_pair` of TRL >= 1.0, which dropped the shift.
  """
  r_c = beta * (_f32(policy_chosen) - _f32(ref_chosen))
  r_r = beta * (_f32(policy_rejected) - _f32(ref_rejected))
  if state is None:
    delta, new_state = 0.0, None
  else:
    batch_mean = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([r_c, r_r])))
    count = state.count + 1.0
    delta = state.mean + (batch_mean - state.mean) / count
    new_state = BCOState(delta, count)
  loss = jnp.mean(-jax.nn.log_sigmoid(r_c - delta) - jax.nn.log_sigmoid(-(r_r - delta)))
  return loss, new_state


def sft_loss(chosen_token_logps, chosen_mask):
  """Generation loss, [B, T], [B, T] -> scalar: NLL of the chosen replies averaged over all their tokens in the
  batch (one token-mean, not a mean of per-sequence means), as TRL's `sft` loss type.

  Differences from TRL, both on degenerate input only: an empty mask gives 0 here, NaN there; TRL 0.21 also
  skips target token id 0 (its `ignore_index=0`), which a caller reproduces by clearing those mask entries."""
  m = _fmask(chosen_mask)
  return -jnp.sum(jnp.where(m > 0, _f32(chosen_token_logps), 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def mpo_loss(chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, ref_chosen, ref_rejected,
             bco_state, *, beta=0.1, weights=MPO_WEIGHTS):
  """The MPO objective. chosen/rejected token log-probs and masks [B, T] (T may differ between the two);
  ref_chosen, ref_rejected [B] reference sequence log-probs; bco_state a `BCOState` (or None, see
  `bco_pair_loss`); weights (w_sigmoid, w_bco_pair, w_sft).

  -> (loss, (metrics, new_bco_state)), ready for `jax.value_and_grad(..., has_aux=True)`. Metrics are plain
  β·log-ratios (TRL 0.21 logs the loss-weight-summed rewards, i.e. 2.0x these with the default weights)."""
  w_p, w_q, w_g = weights
  pc = sequence_logps(chosen_token_logps, chosen_mask)
  pr = sequence_logps(rejected_token_logps, rejected_mask)
  l_p = dpo_sigmoid_loss(pc, pr, ref_chosen, ref_rejected, beta)
  l_q, new_state = bco_pair_loss(pc, pr, ref_chosen, ref_rejected, bco_state, beta)
  l_g = sft_loss(chosen_token_logps, chosen_mask)
  loss = w_p * l_p + w_q * l_q + w_g * l_g
  r_c = jax.lax.stop_gradient(beta * (pc - _f32(ref_chosen)))
  r_r = jax.lax.stop_gradient(beta * (pr - _f32(ref_rejected)))
  metrics = {
      "loss/sigmoid": l_p, "loss/bco_pair": l_q, "loss/sft": l_g,
      "rewards/chosen": jnp.mean(r_c), "rewards/rejected": jnp.mean(r_r),
      "rewards/accuracies": jnp.mean((r_c > r_r).astype(jnp.float32)), "rewards/margins": jnp.mean(r_c - r_r),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(pc)), "logps/rejected": jnp.mean(jax.lax.stop_gradient(pr)),
      "bco/delta": jnp.zeros((), jnp.float32) if new_state is None else new_state.mean,
  }
  return loss, (metrics, new_state)


# ----------------------------------------------------------------------------------------------------------
# GSPO / GRPO (online RL)


def group_advantages(rewards, group_size=None, eps=1e-6):
  """Eq. 4: Â_i = (r_i − mean_group) / (std_group + eps), per group of G responses to one prompt.

  rewards [P, G], or [P*G] (responses of a prompt adjacent) with group_size=G; returns the input's shape.
  std is the unbiased one and eps 1e-6, as verl's GRPO estimator (TRL uses 1e-4). A group of one has no
  spread; verl then uses mean 0, std 1, kept here so such a group still trains on its raw reward."""
  r = _f32(rewards)
  flat = r.ndim == 1
  if flat:
    if group_size is None:
      raise ValueError("flat rewards need group_size")
    r = r.reshape(-1, group_size)
  if r.shape[1] == 1:
    adv = r / (1.0 + eps)
  else:
    adv = (r - r.mean(1, keepdims=True)) / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
  return adv.reshape(-1) if flat else adv


def _aggregate(per_token, m, agg):
  """[B, T] -> scalar. seq-mean-token-mean: every response weighs the same whatever its length (the GSPO
  choice, hard-coded in verl's GSPO); token-mean: every token does (TRL's bnpo). An empty row counts as a
  response with loss 0, as in TRL."""
  if agg == "seq-mean-token-mean":
    return jnp.mean(jnp.sum(per_token * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
  if agg == "token-mean":
    return jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
  raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _clipped_policy_loss(ratio, lp, advantages, m, eps_low, eps_high, kl_coef, ref_logps, agg, per_sequence):
  """PPO clip objective on `ratio` ([B, T]) plus the optional k3 KL to the reference; shared by GSPO/GRPO."""
  if ref_logps is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
    raise ValueError("kl_coef != 0 needs ref_logps")
  adv = _f32(advantages)[:, None]
  pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
  metrics = {}
  if ref_logps is not None:
    # k3 = e^(ref−π) − (ref−π) − 1 (Schulman): unbiased for KL(π‖ref) under samples from π, and never negative.
    d = jnp.where(m > 0, _f32(ref_logps), 0.0) - lp
    kl = jnp.exp(d) - d - 1.0
    pg = pg + kl_coef * kl
    metrics["kl"] = jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)
  loss = _aggregate(pg, m, agg)

  # Logged like TRL: a clipped region is one where the clip zeroes the gradient (it is never a gain).
  r = jax.lax.stop_gradient(ratio)
  low = ((r < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
  high = ((r > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
  if per_sequence:  # every token of a response shares one ratio, so count responses
    mean = lambda x: jnp.mean(x[:, 0])
  else:
    mean = lambda x: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  metrics.update({"clip_frac": mean(jnp.maximum(low, high)), "clip_frac_low": mean(low),
                  "clip_frac_high": mean(high), "ratio_mean": mean(r)})
  return loss, metrics


def gspo_loss(logps, old_logps, advantages, mask, eps_low=0.2, eps_high=0.2, kl_coef=0.0, ref_logps=None, *,
              agg="seq-mean-token-mean"):
  """GSPO (eq. 5-6), minimised. logps [B, T] current policy (differentiated); old_logps [B, T] the rollout
  policy; advantages [B] (`group_advantages`, flattened); mask [B, T]; ref_logps [B, T] only for kl_coef != 0
  (InternVL3.5 trains GSPO without a reference model: kl_coef 0).

  s_i = exp(mean_t(log π − log π_old)) is the geometric mean of the token ratios. It enters as verl builds it,
  one value per token: exp(log π_t − sg(log π_t) + sg(log s_i)) equals s_i but has gradient s_i·∇log π_t, so
  after the token-mean each token carries s_i/|y_i| of ∇ — exactly ∇s_i — while clipping stays per sequence.
  -> (loss, metrics: clip_frac[_low|_high] and ratio_mean over responses, kl if ref_logps is given)."""
  m = _fmask(mask)
  lp = jnp.where(m > 0, _f32(logps), 0.0)
  log_ratio = lp - jnp.where(m > 0, _f32(old_logps), 0.0)
  log_s = jnp.sum(log_ratio, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
  tok = lp - jax.lax.stop_gradient(lp) + jax.lax.stop_gradient(log_s)[:, None]
  ratio = jnp.exp(jnp.minimum(tok, _GSPO_MAX_LOG_RATIO))
  return _clipped_policy_loss(ratio, lp, advantages, m, eps_low, eps_high, kl_coef, ref_logps, agg, True)


def grpo_loss(logps, old_logps, advantages, mask, eps_low=0.2, eps_high=0.2, kl_coef=0.0, ref_logps=None, *,
              agg="seq-mean-token-mean"):
  """Token-level GRPO/PPO clip objective with `gspo_loss`'s signature: ratio_t = π/π_old per token, clipped per
  token. No dual clip (verl's vanilla loss adds one for negative advantages; TRL does not).
  -> (loss, metrics over completion tokens)."""
  m = _fmask(mask)
  lp = jnp.where(m > 0, _f32(logps), 0.0)
  log_ratio = lp - jnp.where(m > 0, _f32(old_logps), 0.0)
  ratio = jnp.exp(jnp.clip(log_ratio, -_GRPO_LOG_RATIO_CLAMP, _GRPO_LOG_RATIO_CLAMP))
  return _clipped_policy_loss(ratio, lp, advantages, m, eps_low, eps_high, kl_coef, ref_logps, agg, False)
