"""Cascade RL around the steps: rollouts from the inference engine with their recorded log-probs, the GSPO batch
made of them, MMPR-style pairs (reader, bad lines, MPO batch, pairs from rollouts), and the MPO and GSPO stages
of train.py end to end (each from the previous stage's export; an MPO run resumed from its checkpoint, BCO
shift included, repeats the uninterrupted run's losses)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from internvl_jax import digits, trainer
from internvl_jax.data import load_records
from internvl_jax.generation import Engine
from internvl_jax.internvl import init_model
from internvl_jax.metrics import read_losses
from internvl_jax.processor import IGNORE
from internvl_jax.rl import gspo, losses, mpo, pairs, rollout
from internvl_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("digits"))
  digits.build(out, train_pairs=60, eval_pairs=8)
  return out


@pytest.fixture(scope="module")
def parts(data):
  """(config, processor, a random digits-shaped model)."""
  from configs import digits as digits_config
  cfg = digits_config.get_config()
  cfg.data_root = data
  tok = Tokenizer.from_pretrained(data)
  model_cfg = trainer.model_config(cfg, tok)
  return cfg, trainer.make_processor(cfg, model_cfg, tok), init_model(model_cfg, seed=0)


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

  tok_logps, mask = mpo.policy_token_logps(model, {k: batch[k] for k in gspo.BATCH_KEYS})
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
  done = subprocess.run([sys.executable, "-m", "internvl_jax.rl.pairs", f"--checkpoint={export}",
                         f"--meta={data}/train_meta.json", f"--out={tmp_path / 'own'}", "--limit=4", "--group=2",
                         "--max_new_tokens=4", "--max_tiles=1", "--no-thumbnail"], env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  info = json.loads(done.stdout.strip().splitlines()[-1])
  assert info["questions"] == 4 and info["rollouts"] == 8 and os.path.exists(tmp_path / "own" / "pairs.jsonl")

  meta = _write_pairs(str(tmp_path / "hand"), GOOD * 4, data)
  mpo_args = (f"--config.model.checkpoint={export}", f"--config.data.meta={meta}", "--config.steps=4",
              "--config.batch_size=2", "--config.checkpoint.every=2", "--config.eval.every=1000")
  out = _train("digits_mpo.py", mpo_dir, data, *mpo_args)
  assert "step 4/4" in out and "accuracy" in out
  full = read_losses(mpo_dir)
  lines = [json.loads(x) for x in open(os.path.join(mpo_dir, "metrics.jsonl"))]
  assert {"loss/sigmoid", "loss/bco_pair", "loss/sft", "bco/delta"} <= set(lines[0])
  assert lines[0]["loss/sigmoid"] == pytest.approx(np.log(2), abs=1e-5)  # the policy starts at the reference

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

  out = _train("digits_gspo.py", gspo_dir, data, f"--config.model.checkpoint={mpo_dir}/export", "--config.steps=2",
               "--config.batch_size=2", "--config.gspo.group_size=2", "--config.gspo.rollout_prompts=4",
               "--config.gspo.max_draws=2", "--config.gspo.max_new_tokens=4", "--config.gspo.max_rows=8",
               "--config.eval.every=1000")
  assert "step 2/2" in out
  lines = [json.loads(x) for x in open(os.path.join(gspo_dir, "metrics.jsonl")) if '"train"' in x]
  assert lines[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the recorded log-probs are the policy's
  assert 0 <= lines[0]["rollout_accuracy"] <= 1 and lines[0]["draws"] >= 1
  assert os.path.exists(os.path.join(gspo_dir, "export", "config.json"))
