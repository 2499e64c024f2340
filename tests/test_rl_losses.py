"""Cascade RL losses (`internvl_jax.training.rl`) against TRL's own loss code on identical log-probs: values, logged
metrics and gradients (jax.grad vs torch autograd through TRL).

No TRL trainer is built: its loss methods are called unbound with a SimpleNamespace standing in for `self`
(the attributes those methods read) and a stand-in model that returns the given per-token log-probs. TRL >= 1.0
(`DPOTrainer._compute_loss`, the pinned test dependency) has sigmoid / bco_pair / sft but no bco_pair reward
shift δ; MPO as it runs (with δ) is compared with a torch transcription of TRL 0.21 (the version InternVL3.5
pins, which the trl>=1.0 pin excludes). Everything here takes seconds (tiny arrays, CPU).
"""
import collections
import inspect
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from internvl_jax.training import rl

RTOL = 1e-5
MAX_ERR = {}  # name -> max relative error seen (printed with -s)


def close(name, ours, ref):
  """rtol 1e-5 elementwise; entries far below the array's scale (gradients of masked tokens) get an absolute
  floor of 1e-6 x that scale, since a relative error of a ~0 entry says nothing about the loss."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  scale = max(float(np.max(np.abs(ref))), 1e-30)
  big = np.abs(ref) > 1e-3 * scale
  MAX_ERR[name] = float(np.max(np.abs(ours - ref)[big] / np.abs(ref)[big])) if big.any() else 0.0
  print(f"{name}: max rel err {MAX_ERR[name]:.2e}")
  np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-6 * scale, err_msg=name)


class Acc:
  """Single-process accelerate.Accelerator: gathers and reductions are identities."""
  device = torch.device("cpu")
  use_distributed = False
  num_processes = 1
  is_main_process = True
  gather = gather_for_metrics = staticmethod(lambda x: x)
  reduce = staticmethod(lambda x, reduction="sum": x)


@pytest.fixture(scope="module")
def trl_trainers():
  """TRL's trainers, imported only by the tests that run TRL's code. TRL is pinned in requirements-test.txt,
  so an import failure here is an error, never a skip."""
  from trl import DPOTrainer, GRPOTrainer
  return SimpleNamespace(dpo=DPOTrainer, grpo=GRPOTrainer, grpo_src=inspect.getsource(GRPOTrainer._compute_loss))


def metrics_store():
  return collections.defaultdict(lambda: collections.defaultdict(list))


def pair_batch(seed, b=4, t=9, shift=0.0):
  """Token log-probs [B, T] of chosen and rejected replies, their masks (prompt-free, right-padded, lengths
  1..T) and reference sequence log-probs near the policy's so that the log-ratios are O(1)."""
  rng = np.random.default_rng(seed)
  lp = lambda: (-np.abs(rng.normal(size=(b, t))) - 0.05).astype(np.float32)
  mask = lambda: (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(np.float32)
  c, r, mc, mr = lp(), lp(), mask(), mask()
  ref_c = ((c * mc).sum(1) + rng.normal(size=b) * 2 + shift).astype(np.float32)
  ref_r = ((r * mr).sum(1) + rng.normal(size=b) * 2 - shift).astype(np.float32)
  return c, r, mc, mr, ref_c, ref_r


# ---------------------------------------------------------------------------------------------- MPO


def trl_dpo(dpo_trainer, loss_types, weights, batch, beta):
  """TRL >= 1.0 `DPOTrainer._compute_loss` (precomputed reference log-probs) -> (loss, metrics, dloss/dc,
  dloss/dr). Its batch is [chosen; rejected] with one prompt token in front (the completion mask is shifted
  by one inside)."""
  c, r, mc, mr, ref_c, ref_r = batch
  logps = torch.tensor(np.concatenate([c, r]), requires_grad=True)
  mask = torch.tensor(np.concatenate([mc, mr]))
  completion_mask = torch.cat([torch.zeros(len(mask), 1), mask], 1).long()

  def model(**kw):  # the fused LM head returns 0 log-prob at label -100, which TRL's unmasked sum relies on
    n = logps.shape
    return SimpleNamespace(log_probs=logps * mask, entropy=torch.zeros(n), mean_logits=torch.zeros(n),
                           is_top1=torch.zeros(n, dtype=torch.bool))

  me = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Acc(), aux_loss_enabled=False,
                       ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                       loss_types=list(loss_types), loss_weights=list(weights), beta=beta, label_smoothing=0.0,
                       use_weighting=False, _metrics=metrics_store(), _total_train_tokens=0, _tp_size=1)
  inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
            "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor(ref_c),
            "ref_rejected_logps": torch.tensor(ref_r)}
  loss = dpo_trainer._compute_loss(me, model, inputs, return_outputs=False)
  loss.backward()
  g = logps.grad.numpy()
  return loss.item(), {k: v[-1] for k, v in me._metrics["train"].items()}, g[:len(c)], g[len(c):]


@pytest.mark.parametrize("loss_types, weights", [(["sigmoid"], [1.0]), (["bco_pair"], [1.0]), (["sft"], [1.0]),
                                                 (["sigmoid", "bco_pair", "sft"], list(rl.MPO_WEIGHTS))])
def test_mpo_vs_trl(trl_trainers, loss_types, weights):
  batch = pair_batch(0)
  c, r, mc, mr, ref_c, ref_r = batch
  w = dict(zip(loss_types, weights))
  wts = (w.get("sigmoid", 0.0), w.get("bco_pair", 0.0), w.get("sft", 0.0))
  beta = 0.1 if len(loss_types) > 1 else 0.3

  def f(c, r):  # TRL >= 1.0 bco_pair has no reward shift: state None
    return rl.mpo_loss(c, r, mc, mr, ref_c, ref_r, None, beta=beta, weights=wts)

  (loss, (metrics, state)), (gc, gr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(c, r)
  assert state is None
  ref_loss, ref_metrics, ref_gc, ref_gr = trl_dpo(trl_trainers.dpo, loss_types, weights, batch, beta)
  tag = "+".join(loss_types)
  close(f"mpo[{tag}] loss", loss, ref_loss)
  close(f"mpo[{tag}] grad chosen", gc, ref_gc)
  close(f"mpo[{tag}] grad rejected", gr, ref_gr)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"):
    close(f"mpo[{tag}] {k}", metrics[k], ref_metrics[k])


def test_bco_pair_running_delta():
  """δ after n batches = mean of the n batch means of cat(r_c, r_r) (TRL 0.21 RunningMoments, count from
  1e-24), and each batch's loss uses the δ that already includes it."""
  state, means = rl.bco_init(), []
  for i, shift in enumerate((0.0, 3.0, -1.0)):
    c, r, mc, mr, ref_c, ref_r = pair_batch(10 + i, shift=shift)
    pc, pr = (c * mc).sum(1), (r * mr).sum(1)
    loss, state = rl.bco_pair_loss(pc, pr, ref_c, ref_r, state, beta=0.1)
    rc, rr = 0.1 * (pc - ref_c), 0.1 * (pr - ref_r)
    means.append(np.concatenate([rc, rr]).mean())
    delta = np.mean(means)
    want = np.mean(np.logaddexp(0, -(rc - delta)) + np.logaddexp(0, rr - delta))
    close(f"bco δ step {i}", state.mean, delta)
    close(f"bco loss step {i}", loss, want)
  assert float(state.count) == pytest.approx(3.0)


# TRL 0.21 (InternVL3.5's pin) cannot be installed beside the pinned trl>=1.0, so MPO with the bco_pair shift δ is
# compared with a transcription of its code, torch ops as written there, single process. Followed (TRL tag v0.21.0):
#   trl/trainer/utils.py        L396-434   RunningMoments (count starts at 1e-24; `update` of one scalar)
#   trl/trainer/dpo_trainer.py  L1038-1046 logits = (log π_c − log π_r) − (log ref_c − log ref_r)
#                               L1060-1064 sigmoid (label_smoothing 0)
#                               L1089-1099 bco_pair: δ = running mean after this batch's update (a float)
#                               L1170-1179 sft: nll_loss on the chosen replies, expanded over the batch
#                               L1188-1191 the returned rewards, β·log-ratio for every loss type
#                               L1556-1571 sequence log-prob = sum of per-token log-probs on the loss mask
#                               L1586-1594 nll_loss = cross-entropy (token mean) over the chosen labels
#                               L1669-1690 weighted sum of the per-type losses and rewards; L1731 .mean()


class RunningMoments021:
  """trl/trainer/utils.py L396-434 without the accelerator (use_distributed False) and without `std`, which
  nothing in the DPO loss reads."""

  def __init__(self):
    self.mean, self.var, self.count = 0.0, 1.0, 1e-24

  @torch.no_grad()
  def update(self, xs):
    xs_count = xs.numel()
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    xs_mean, xs_var = xs_mean.float(), xs_var.float()
    delta = xs_mean - self.mean
    tot_count = self.count + xs_count
    new_sum = xs_var * xs_count
    old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
    tot_sum = old_sum + new_sum
    self.mean += (delta * xs_count / tot_count).item()
    self.var = (tot_sum / tot_count).item()
    self.count = tot_count


def dpo_loss_021(running, beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type,
                 nll_loss=None):
  """`DPOTrainer.dpo_loss` (reference_free False, f_divergence reverse_kl, label_smoothing 0) for the three MPO
  loss types -> (losses [B], chosen_rewards [B], rejected_rewards [B])."""
  chosen_logratios = chosen_logps - ref_chosen_logps
  rejected_logratios = rejected_logps - ref_rejected_logps
  logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
  if loss_type == "sigmoid":
    losses = -F.logsigmoid(beta * logits)
  elif loss_type == "bco_pair":
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    rewards = torch.cat((chosen_rewards, rejected_rewards), 0).mean().detach()
    running.update(rewards)
    delta = running.mean
    losses = -F.logsigmoid((beta * chosen_logratios) - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
  elif loss_type == "sft":
    losses = nll_loss.expand(chosen_logps.shape[0])
  else:
    raise ValueError(loss_type)
  chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
  rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
  return losses, chosen_rewards, rejected_rewards


def mpo_021(running, loss_types, weights, batch, beta):
  """`get_batch_loss_metrics` on per-token log-probs -> (loss, rewards metrics, dloss/dc, dloss/dr). The
  per-token log-probs stand for `selective_log_softmax`'s output, so cross-entropy with ignore_index is the
  masked token mean of their negation."""
  c, r, mc, mr, ref_c, ref_r = batch
  tc, tr = torch.tensor(c, requires_grad=True), torch.tensor(r, requires_grad=True)
  mc_t, mr_t = torch.tensor(mc).bool(), torch.tensor(mr).bool()
  chosen_logps = torch.where(mc_t, tc, 0.0).sum(-1)
  rejected_logps = torch.where(mr_t, tr, 0.0).sum(-1)
  nll_loss = -tc[mc_t].mean()
  losses, chosen_rewards, rejected_rewards = 0, 0, 0
  for loss_type, weight in zip(loss_types, weights):
    _losses, _chosen, _rejected = dpo_loss_021(running, beta, chosen_logps, rejected_logps, torch.tensor(ref_c),
                                               torch.tensor(ref_r), loss_type, nll_loss)
    losses = losses + _losses * weight
    chosen_rewards = chosen_rewards + _chosen * weight
    rejected_rewards = rejected_rewards + _rejected * weight
  loss = losses.mean()
  loss.backward()
  metrics = {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
             "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
             "rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}
  return loss.item(), metrics, tc.grad.numpy(), tr.grad.numpy()


@pytest.mark.parametrize("loss_types, weights", [(["bco_pair"], [1.0]),
                                                 (["sigmoid", "bco_pair", "sft"], list(rl.MPO_WEIGHTS))])
def test_mpo_with_delta_vs_trl021_transcription(loss_types, weights):
  """MPO as the MPO step runs it: four successive batches with one `BCOState` (one RunningMoments), their
  reward means apart so that δ is nonzero and moves; loss, gradients w.r.t. the token log-probs, δ and the
  reward metrics at every step. The gradient is where a δ that is not a constant would show."""
  w = dict(zip(loss_types, weights))
  wts = (w.get("sigmoid", 0.0), w.get("bco_pair", 0.0), w.get("sft", 0.0))
  beta = 0.1
  running, state, deltas = RunningMoments021(), rl.bco_init(), []
  step = jax.jit(jax.value_and_grad(
      lambda c, r, mc, mr, ref_c, ref_r, st: rl.mpo_loss(c, r, mc, mr, ref_c, ref_r, st, beta=beta, weights=wts),
      argnums=(0, 1), has_aux=True))
  for i, offset in enumerate((4.0, 12.0, -6.0, 9.0)):
    c, r, mc, mr, ref_c, ref_r = pair_batch(30 + i)
    batch = (c, r, mc, mr, ref_c - offset, ref_r - offset)  # every reward moves by β·offset
    (loss, (metrics, state)), (gc, gr) = step(*batch, state)
    ref_loss, ref_metrics, ref_gc, ref_gr = mpo_021(running, loss_types, weights, batch, beta)
    tag = f"mpo δ[{'+'.join(loss_types)}] step {i}"
    close(f"{tag} δ", state.mean, running.mean)
    close(f"{tag} loss", loss, ref_loss)
    close(f"{tag} grad chosen", gc, ref_gc)
    close(f"{tag} grad rejected", gr, ref_gr)
    close(f"{tag} bco/delta", metrics["bco/delta"], running.mean)
    # TRL 0.21 sums the rewards with the loss weights (sft's included): ours are the plain β·log-ratios
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
      close(f"{tag} {k}", sum(weights) * metrics[k], ref_metrics[k])
    close(f"{tag} rewards/accuracies", metrics["rewards/accuracies"], ref_metrics["rewards/accuracies"])
    deltas.append(float(state.mean))
  assert float(state.count) == pytest.approx(4.0)
  assert min(abs(d) for d in deltas) > 0.1 and min(abs(np.diff(deltas))) > 0.1  # δ nonzero and moving


def test_sequence_logps_and_sft_ignore_padding():
  lp = np.array([[-1.0, -2.0, -np.inf], [-0.5, np.nan, np.nan]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(rl.sequence_logps(lp, mask), [-3.0, -0.5])
  assert float(rl.sft_loss(lp, mask)) == pytest.approx(3.5 / 3)  # token mean, not mean of sequence means
  g = jax.grad(lambda x: rl.sequence_logps(x, mask).sum() + rl.sft_loss(x, mask))(lp)
  assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0)


# ---------------------------------------------------------------------------------------------- GSPO / GRPO


def rollout_batch(seed, p=2, g=4, t=10):
  """P prompts x G responses: current / old / reference token log-probs [B, T] with ratios spread wide
  enough that both clip sides are hit, masks with lengths 1..T, group-normalised advantages [B]."""
  rng = np.random.default_rng(seed)
  b = p * g
  adv = np.asarray(rl.group_advantages(rng.normal(size=(p, g)).astype(np.float32))).reshape(-1)
  logps = (-np.abs(rng.normal(size=(b, t))) - 0.05).astype(np.float32)
  # log s_i pushed by ±0.8 along the advantage's sign on the first group (which has both signs): clipped high
  # where A > 0, low where A < 0; the second group stays mostly inside the trust region.
  push = np.where(np.arange(b) < g, 0.8, 0.05) * np.sign(adv)
  old = (logps - rng.normal(size=(b, t)) * 0.3 - push[:, None]).astype(np.float32)
  ref = (logps + rng.normal(size=(b, t)) * 0.2).astype(np.float32)
  mask = (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(np.float32)
  return logps, old, ref, mask, adv


def trl_grpo(trainers, level, loss_type, batch, kl_coef, eps_low, eps_high):
  """TRL `GRPOTrainer._compute_loss` on the given log-probs -> (loss, metrics, dloss/dlogps)."""
  logps, old, ref, mask, adv = batch
  leaf = torch.tensor(logps, requires_grad=True)
  three = "aux_loss = self._get_per_token_logps_and_entropies" in trainers.grpo_src  # TRL >= 1.0 also returns aux loss

  def per_token(model, input_ids, attention_mask, logits_to_keep, **kw):
    out = (leaf, torch.zeros_like(leaf))
    return out + (None,) if three else out

  b, t = logps.shape
  me = SimpleNamespace(
      _get_per_token_logps_and_entropies=per_token, top_entropy_quantile=1.0, beta=kl_coef,
      importance_sampling_level=level, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
      args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
      aux_loss_enabled=False, off_policy_mask_threshold=None, use_vllm=False,
      vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
      current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, max_completion_length=t,
      accelerator=Acc(), _metrics=metrics_store())
  inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": torch.tensor(mask),
            "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
            "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": torch.tensor(mask.sum())}
  loss = trainers.grpo._compute_loss(me, None, inputs)
  loss.backward()
  return loss.item(), {k: v[-1] for k, v in me._metrics["train"].items()}, leaf.grad.numpy()


TRL_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean"}


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("trl_loss_type", list(TRL_AGG))
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_policy_loss_vs_trl(trl_trainers, level, trl_loss_type, kl_coef):
  """GSPO = TRL importance_sampling_level="sequence"; GRPO = "token" (TRL's default level). loss_type grpo is
  the seq-mean-token-mean aggregation; bnpo and dapo (TRL 1.x's default: token sum / tokens in the batch) are
  token-mean."""
  assert f'"{trl_loss_type}"' in trl_trainers.grpo_src, f"pinned TRL has no loss_type {trl_loss_type}"
  batch = rollout_batch(1)
  logps, old, ref, mask, adv = batch
  eps_low, eps_high = 0.2, 0.28  # asymmetric, so a swapped low/high would show
  fn = rl.gspo_loss if level == "sequence" else rl.grpo_loss

  def f(x):
    return fn(x, old, adv, mask, eps_low, eps_high, kl_coef, ref if kl_coef else None, agg=TRL_AGG[trl_loss_type])

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logps)
  ref_loss, ref_metrics, ref_grad = trl_grpo(trl_trainers, level, trl_loss_type, batch, kl_coef, eps_low, eps_high)
  tag = f"{fn.__name__}[{trl_loss_type}, kl={kl_coef}]"
  close(f"{tag} loss", loss, ref_loss)
  close(f"{tag} grad", grad, ref_grad)
  assert 0 < metrics["clip_frac_low"] and 0 < metrics["clip_frac_high"]  # both clip sides were exercised
  for ours, theirs in (("clip_frac", "clip_ratio/region_mean"), ("clip_frac_low", "clip_ratio/low_mean"),
                       ("clip_frac_high", "clip_ratio/high_mean")):
    close(f"{tag} {ours}", metrics[ours], ref_metrics[theirs])
  if kl_coef:
    close(f"{tag} kl", metrics["kl"], ref_metrics["kl"])


def test_gspo_ratio_is_geometric_mean_and_jits():
  logps, old, ref, mask, adv = rollout_batch(2)
  s = np.exp(((logps - old) * mask).sum(1) / mask.sum(1))
  _, m = jax.jit(rl.gspo_loss)(logps, old, adv, mask)
  close("gspo ratio_mean", m["ratio_mean"], s.mean())
  # on-policy (old = current): the ratio is 1 and the gradient is the advantage-weighted mean ∇log π
  g = jax.grad(lambda x: rl.gspo_loss(x, logps, adv, mask)[0])(logps)
  want = -adv[:, None] * mask / mask.sum(1, keepdims=True) / len(adv)
  close("gspo on-policy grad", g, want)


def test_group_advantages():
  rng = np.random.default_rng(3)
  r = rng.normal(size=(3, 5)).astype(np.float32)
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
  close("advantages [P, G]", rl.group_advantages(r), want)
  close("advantages flat", rl.group_advantages(r.reshape(-1), group_size=5), want.reshape(-1))
  np.testing.assert_allclose(rl.group_advantages(np.ones((2, 4))), 0.0)  # no spread: no signal, no NaN
  np.testing.assert_allclose(rl.group_advantages(np.array([[2.0]])), [[2.0 / (1 + 1e-6)]])  # verl's G = 1


def test_mpo_jits_with_state():
  c, r, mc, mr, ref_c, ref_r = pair_batch(4)
  step = jax.jit(jax.value_and_grad(lambda c, st: rl.mpo_loss(c, r, mc, mr, ref_c, ref_r, st), has_aux=True))
  (loss, (metrics, state)), grad = step(c, rl.bco_init())
  (loss2, (_, state2)), _ = step(c, state)
  assert np.isfinite(loss) and grad.shape == c.shape
  assert float(state2.count) == pytest.approx(2.0) and float(state2.mean) == pytest.approx(float(state.mean))
  assert set(metrics) >= {"loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/accuracies", "bco/delta"}
