"""Cascade RL around the steps: rollouts from the inference engine with their recorded log-probs, the GSPO batch
made of them, MMPR-style pairs (reader, bad lines, MPO batch, pairs from rollouts), and the MPO and GSPO stages
of train.py end to end (each from the previous stage's export; an MPO run resumed from its checkpoint, BCO
shift included, repeats the uninterrupted run's losses)."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import digits_setup

from internvl_jax.demos import digits
from internvl_jax.data import load_records
from internvl_jax.inference.engine import Engine
from internvl_jax.model.internvl import init_model
from internvl_jax.training.metrics import read_losses
from internvl_jax.inputs.labels import IGNORE
from internvl_jax.training.rl import gspo, losses, pairs, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("digits"))
  digits.build(out, train_pairs=60, eval_pairs=8)
  return out


@pytest.fixture(scope="module")
def parts(data):
  """(config, processor, a random digits-shaped model)."""
  cfg, model_cfg, processor = digits_setup(data)
  return cfg, processor, init_model(model_cfg, seed=0)


def test_rollout_logps_are_the_train_steps_logps(data, parts):
  """The log-probs recorded while sampling (incremental KV-cache decode) equal the train step's full forward
  on the finished rows, so GSPO's importance ratio is 1 at the rollout point."""
  cfg, processor, model = parts
  questions = load_records(os.path.join(data, "train_meta.json"), limit=3)
  group, new = 4, 6
  rolls = rollout.sample(model, Engine(model), processor, questions, group_size=group, max_new_tokens=new,
                         temperature=1.0, seed=1, max_rows=8)
  assert rolls.ids.shape == rolls.logps.shape == (3, group, new) and rolls.lengths.shape == (3, group)
  assert len({tuple(r) for r in rolls.ids.reshape(-1, new)}) > 1  # sampled, not one greedy answer
  assert np.all(rolls.logps[np.arange(new) < rolls.lengths[..., None]] < 0)
  rewards = np.arange(12, dtype=np.float32).reshape(3, group) % 3
  adv = np.asarray(losses.group_advantages(rewards))
  batch = rollout.gspo_batch(rolls, [2, 0], adv, max_tokens=80, max_tiles=1, pad_id=processor.tokenizer.pad_id,
                             tile_size=processor.tile_size)
  assert batch["input_ids"].shape == (2 * group, 80) and batch["pixel_values"].shape[:2] == (2 * group, 1)
  np.testing.assert_array_equal(batch["advantages"], np.concatenate([adv[2], adv[0]]))
  # row 0 = prompt 2, response 0: prompt unlabelled, response labelled and equal to the sampled ids
  n_p, n_r = len(rolls.prompts[2]["input_ids"]), rolls.lengths[2, 0]
  assert np.all(batch["labels"][0, :n_p] == IGNORE) and np.all(batch["labels"][0, n_p + n_r:] == IGNORE)
  np.testing.assert_array_equal(batch["labels"][0, n_p:n_p + n_r], rolls.ids[2, 0, :n_r])

  tok_logps, mask = losses.policy_token_logps(model, {k: batch[k] for k in gspo.BATCH_KEYS})
  mask = np.asarray(mask)
  assert mask.sum() == rolls.lengths[[2, 0]].sum()
  np.testing.assert_allclose(np.asarray(tok_logps)[mask], batch["old_logps"][mask], atol=2e-5, rtol=1e-5)
  _, metrics = losses.gspo_loss(tok_logps, batch["old_logps"], batch["advantages"], mask)
  assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-4


def test_rollout_group_must_divide_the_rows(data, parts):
  _, processor, model = parts
  with pytest.raises(ValueError, match="multiple of group_size"):
    rollout.sample(model, Engine(model), processor, [], group_size=3, max_new_tokens=2, max_rows=8)


def _write_pairs(folder, lines, image_root):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
    f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
  meta = {"mmpr": {"root": image_root, "annotation": os.path.join(folder, "pairs.jsonl"), "repeat_time": 1}}
  with open(os.path.join(folder, "meta.json"), "w") as f:
    json.dump(meta, f)
  return os.path.join(folder, "meta.json")


GOOD = [{"image": "images/scan_0000.png", "question": "<image>\nWhich digit is this?", "chosen": "0", "rejected": "8"},
        {"image": "images/scan_0001.png", "question": "Which digit is this?", "chosen": "1", "rejected": "7"}]


def test_pairs_reader_skips_and_names_bad_lines(data, parts, tmp_path):
  _, processor, _ = parts
  lines = GOOD + ["{not json", {"image": "images/scan_0002.png", "question": "q", "chosen": "2"},
                  {"image": "images/scan_0003.png", "question": "q", "chosen": "3", "rejected": " 3 "},
                  {"image": "images/nope.png", "question": "q", "chosen": "3", "rejected": "4"}]
  found, skipped = pairs.load_pairs(_write_pairs(str(tmp_path / "p"), lines, data))
  assert [p["chosen"] for p in found] == ["0", "1"]
  assert {k: len(v) for k, v in skipped.items()} == {"bad_json": 1, "bad_record": 2, "missing_file": 1}
  assert "mmpr line 3" in skipped["bad_json"][0] and "['rejected']" in skipped["bad_record"][0]
  assert "nope.png" in skipped["missing_file"][0]

  rows = [pairs.pair_samples(p, processor=processor, max_tokens=64, max_tiles=1) for p in found]
  batch = pairs.mpo_batch(rows, max_tokens=64, max_tiles=1, pad_id=processor.tokenizer.pad_id, tile_size=56)
  assert batch["input_ids"].shape == (4, 64) and batch["pixel_values"].shape == (4, 1, 56, 56, 3)
  replies = [processor.tokenizer.decode([int(t) for t in row[row != IGNORE]]) for row in batch["labels"]]
  assert [r.split("<|im_end|>")[0] for r in replies] == ["0", "1", "8", "7"]  # chosen rows, then rejected
  # the question without a placeholder got one: both prompts hold one tile's image tokens
  image_tokens = (batch["input_ids"] == processor.tokenizer.image_token_id).sum(1)
  assert np.all(image_tokens == 16)
  with pytest.raises(Exception, match="tokens, more than the row's"):
    pairs.pair_samples(found[0], processor=processor, max_tokens=8, max_tiles=1)


def test_pairs_from_rollouts_take_correct_against_incorrect():
  rolls = rollout.Rollouts(
      questions=[{"dataset": "d", "messages": [{"from": "human", "value": "<image>\nq"}], "images": ["/a.png"],
                  "reference": "3"}] * 3,
      prompts=[None] * 3, ids=np.zeros((3, 3, 2)), logps=np.zeros((3, 3, 2)), lengths=np.ones((3, 3), int),
      texts=[["3", "4", "3"], ["3", "3", "3"], ["5", "4", "6"]])
  correct = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0]], bool)
  out = pairs.pairs_from_rollouts(rolls, correct, per_prompt=2)
  assert [(p["chosen"], p["rejected"]) for p in out] == [("3", "4")]  # distinct texts; mixed prompts only
  assert out[0]["question"] == "<image>\nq" and out[0]["image"] == ["/a.png"]


def _env():
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def _train(config, workdir, data, *extra):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, 'configs', config)}",
         f"--workdir={workdir}", f"--config.data_root={data}", "--config.log_every=1", "--config.eval.generate=4",
         "--config.eval.max_batches=1", *extra]
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_cascade_stages_through_train_py(data, tmp_path):
  sft_dir, mpo_dir, gspo_dir = (str(tmp_path / n) for n in ("sft", "mpo", "gspo"))
  _train("digits.py", sft_dir, data, "--config.steps=4", "--config.batch_size=2", "--config.data.max_tokens=128",
         "--config.eval.every=1000")
  export = os.path.join(sft_dir, "export")

  # pairs from the model's own rollouts (a 4-step model rarely has correct answers: hand-written pairs train)
  done = subprocess.run([sys.executable, "-m", "internvl_jax.training.rl.pairs", f"--checkpoint={export}",
                         f"--meta={data}/train_meta.json", f"--out={tmp_path / 'own'}", "--limit=4", "--group=2",
                         "--max_new_tokens=4", "--max_tiles=1", "--no-thumbnail"], env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  info = json.loads(done.stdout.strip().splitlines()[-1])
  assert info["questions"] == 4 and info["rollouts"] == 8 and os.path.exists(tmp_path / "own" / "pairs.jsonl")

  # lines 3 and 4 are valid JSON but their chosen reply is longer than a row (data.max_tokens 64): skipped when
  # their turn comes, which is in step 2 (pair j of the run is permutation((seed 0, epoch))[j], 10 pairs)
  too_long = {"image": "images/scan_0002.png", "question": "Which digit is this?", "chosen": "2 " * 80,
              "rejected": "5"}
  meta = _write_pairs(str(tmp_path / "hand"), GOOD + [too_long] * 2 + GOOD * 3, data)
  order = np.concatenate([np.random.default_rng((0, e)).permutation(10) for e in range(2)])
  want, j = [], 0
  for _ in range(4):  # skipped pairs after each step, by walking the order
    rows = 0
    while rows < 2:
      rows, j = rows + (order[j] not in (2, 3)), j + 1
    want.append(int(np.isin(order[:j], (2, 3)).sum()))
  assert want[0] == 0 < want[1]  # skips before the checkpoint at step 2: the resume below must carry them
  mpo_args = (f"--config.model.checkpoint={export}", f"--config.data.meta={meta}", "--config.steps=4",
              "--config.batch_size=2", "--config.checkpoint.every=2", "--config.eval.every=1000")
  out = _train("digits_mpo.py", mpo_dir, data, *mpo_args)
  assert "step 4/4" in out and "accuracy" in out
  reports = [x for x in out.splitlines() if x.startswith("mpo data: skipped")]
  assert len(reports) == want[-1] and all(x.startswith(("mpo data: skipped mmpr line 3: too_long:",
                                                        "mpo data: skipped mmpr line 4: too_long:")) for x in reports)
  full = read_losses(mpo_dir)
  lines = [json.loads(x) for x in open(os.path.join(mpo_dir, "metrics.jsonl"))]
  assert {"loss/sigmoid", "loss/bco_pair", "loss/sft", "bco/delta"} <= set(lines[0])
  assert lines[0]["loss/sigmoid"] == pytest.approx(np.log(2), abs=1e-5)  # the policy starts at the reference
  assert [x["skipped_pairs"] for x in lines if "skipped_pairs" in x] == want

  # resume from step 2 (state and BCO shift from the checkpoint): steps 3 and 4 repeat exactly
  again = str(tmp_path / "mpo_again")
  shutil.copytree(mpo_dir, again)
  shutil.rmtree(os.path.join(again, "checkpoints", "4"))
  os.remove(os.path.join(again, "metrics.jsonl"))
  out = _train("digits_mpo.py", again, data, *mpo_args)
  assert "resumed from" in out
  resumed = read_losses(again)
  assert sorted(resumed) == [3, 4]
  np.testing.assert_array_equal([resumed[3], resumed[4]], [full[3], full[4]])
  lines = [json.loads(x) for x in open(os.path.join(again, "metrics.jsonl"))]
  assert [x["skipped_pairs"] for x in lines if "skipped_pairs" in x] == want[2:]

  out = _train("digits_gspo.py", gspo_dir, data, f"--config.model.checkpoint={mpo_dir}/export", "--config.steps=2",
               "--config.batch_size=2", "--config.gspo.group_size=2", "--config.gspo.rollout_prompts=4",
               "--config.gspo.max_draws=2", "--config.gspo.max_new_tokens=4", "--config.gspo.max_rows=8",
               "--config.eval.every=1000")
  assert "step 2/2" in out
  lines = [json.loads(x) for x in open(os.path.join(gspo_dir, "metrics.jsonl")) if '"train"' in x]
  assert lines[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the recorded log-probs are the policy's
  assert 0 <= lines[0]["rollout_accuracy"] <= 1 and lines[0]["draws"] >= 1
  assert os.path.exists(os.path.join(gspo_dir, "export", "config.json"))


def _round_config(max_draws, group=4):
  import ml_collections
  return ml_collections.ConfigDict(dict(seed=0, batch_size=2, gspo=dict(
      mini_batches=2, rollout_prompts=3, group_size=group, max_new_tokens=2, temperature=1.0, top_p=1.0, max_rows=8,
      max_draws=max_draws, accuracy_range=(0.2, 0.8), rewards={"accuracy": 1.0})))


def _scripted_rounds(monkeypatch, script):
  """Replaces the sampler: draw d answers prompt p of its pick correctly script[d][p] times out of G (the
  first ones), so the accuracy filter's decisions are known. -> the list of draws made."""
  calls = []

  def sample(model, engine, processor, questions, *, group_size, **kw):
    n_right = script[len(calls)]
    texts = [["7"] * n + ["1"] * (group_size - n) for n in n_right]
    shape = (len(questions), group_size, 2)
    out = rollout.Rollouts(list(questions), [None] * len(questions), np.zeros(shape, int), np.zeros(shape),
                           np.ones(shape[:2], int), texts)
    out.draw = len(calls)
    calls.append([q["id"] for q in questions])
    return out

  monkeypatch.setattr(gspo.rollout, "sample", sample)
  return calls


QUESTIONS = [{"id": i, "reference": "7"} for i in range(6)]
NO_RUN = SimpleNamespace(processor=None)  # the scripted sampler needs no processor, engine or model


def test_gspo_round_draws_until_enough_prompts_pass(monkeypatch):
  """need = mini_batches x batch_size = 4 prompts with rollout accuracy in [0.2, 0.8]: 2 + 1 + 2 kept over the
  draws, so the round stops after the third of up to five draws, the kept ones in draw order."""
  calls = _scripted_rounds(monkeypatch, [[2, 4, 1], [0, 3, 4], [1, 0, 3], [2, 2, 2]])
  groups, metrics = gspo._rollout_round(_round_config(max_draws=5), NO_RUN, None, None, QUESTIONS, 0)
  assert len(calls) == 3 and metrics["draws"] == 3 and metrics["kept_prompts"] == 4
  assert [(r.draw, i) for r, i, _ in groups] == [
      (0, 0), (0, 2), (1, 1), (2, 0)]
  assert metrics["rollout_accuracy"] == pytest.approx((7 + 7 + 4) / 36)
  for rolls, i, adv in groups:  # each kept group carries its own normalised advantages
    correct = np.asarray([t == "7" for t in rolls.texts[i]], np.float32)
    np.testing.assert_allclose(adv[i], losses.group_advantages(correct[None])[0], rtol=1e-6)
    assert np.abs(adv[i]).max() > 0.5


def test_gspo_round_stops_at_max_draws_and_fills_with_zero_advantage(monkeypatch):
  """One prompt in range per draw: after max_draws = 2 draws 2 of the 4 needed are kept and the rest is filled
  with the first out-of-range prompts (all right or all wrong: equal rewards, advantage exactly 0)."""
  calls = _scripted_rounds(monkeypatch, [[4, 2, 0], [0, 4, 3], [2, 2, 2]])
  groups, metrics = gspo._rollout_round(_round_config(max_draws=2), NO_RUN, None, None, QUESTIONS, 1)
  assert len(calls) == 2 and metrics["draws"] == 2 and metrics["kept_prompts"] == 2
  order = [(r.draw, i) for r, i, _ in groups]
  assert order == [(0, 1), (1, 2), (0, 0), (0, 2)]  # kept first, then fillers in draw order
  for rolls, i, adv in groups[2:]:
    np.testing.assert_array_equal(adv[i], np.zeros(4))
  assert all(np.abs(adv[i]).max() > 0.5 for _, i, adv in groups[:2])
