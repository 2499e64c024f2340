"""train.py end to end on a small digits set: a run killed with SIGKILL and resumed by rerunning the same
command follows the uninterrupted run's loss curve exactly; the export is read by from_pretrained and the
Processor; config overrides; the console line, metrics.jsonl and TensorBoard files; samples whose image is
missing are skipped, and counted and reported as a replay of the data pipeline counts them; the console shows
our lines and none of orbax's INFO lines."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import digits_setup

from internvl_jax.training.metrics import read_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 24, 4
BROKEN = 200  # records whose image is missing, beside 1557 good ones


@pytest.fixture(scope="module")
def train_meta(digits_dir, tmp_path_factory):
  """The digits training meta plus a dataset of BROKEN records whose image file does not exist."""
  here = tmp_path_factory.mktemp("meta")
  meta = json.load(open(os.path.join(digits_dir, "train_meta.json")))
  turns = [{"from": "human", "value": "<image>\nWhich digit is this?"}, {"from": "gpt", "value": "7"}]
  with open(here / "broken.jsonl", "w") as f:
    for i in range(BROKEN):
      f.write(json.dumps({"id": f"broken-{i}", "image": f"images/missing_{i}.png", "conversations": turns}) + "\n")
  meta["broken"] = dict(root=digits_dir, annotation=str(here / "broken.jsonl"), repeat_time=1, data_augment=False,
                        length=BROKEN)
  with open(here / "train_meta.json", "w") as f:
    json.dump(meta, f)
  return str(here / "train_meta.json")


DATA = dict(max_tokens=128, max_tiles_per_row=4)


def command(workdir, data, *extra, meta=None):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs/digits.py"),
          f"--workdir={workdir}", f"--config.data_root={data}", f"--config.steps={STEPS}", "--config.batch_size=2",
          *[f"--config.data.{k}={v}" for k, v in DATA.items()], *([f"--config.data.meta={meta}"] if meta else []),
          f"--config.checkpoint.every={EVERY}",
          "--config.log_every=1", "--config.eval.every=1000", "--config.eval.generate=4",
          "--config.eval.max_batches=1", *extra]


def env():
  # One CPU device: the digits config's mesh takes all devices, and this test is about resumption.
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}




def replayed_skips(digits_dir, meta, steps):
  """The data pipeline of the runs below, in this process: skipped samples after each of `steps` batches."""
  from internvl_jax import data
  cfg, _, processor = digits_setup(digits_dir)
  cfg.data.update(meta=meta, **DATA)
  it = data.make_iterator(cfg.data, processor, batch_size=2, seed=cfg.seed, process_index=0, process_count=1)
  counts = []
  for _ in range(steps):
    next(it)
    counts.append(it.stats()["skipped"])
  it.close()
  assert it.stats()["reasons"] == {"missing_file": counts[-1]}
  return counts


def skips_logged(workdir):
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["skipped_samples"] for r in lines if r["kind"] == "train"}  # a resumed step: last wins


def test_killed_run_resumes_on_the_same_curve(digits_dir, train_meta, tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  done = subprocess.run(command(full, digits_dir, meta=train_meta), env=env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 24/24  loss" in done.stdout and "tok/s" in done.stdout and "ETA" in done.stdout
  assert "accuracy" in done.stdout  # the eval table at the last step
  # Skipped samples: counted per step in metrics.jsonl as the replayed pipeline counts them, and each new
  # count printed once with its reason.
  skips = replayed_skips(digits_dir, train_meta, STEPS)
  assert 0 < skips[-1] < BROKEN and [skips_logged(full)[s] for s in range(1, STEPS + 1)] == skips
  printed = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
  want = [f"data: {k} samples skipped so far {{'missing_file': {k}}}" for k in sorted(set(skips) - {0})]
  assert [line.split(";")[0] for line in printed] == want and "missing_" in printed[0]

  proc = subprocess.Popen(command(killed, digits_dir, meta=train_meta), env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while time.time() < deadline:  # kill a few steps after the second checkpoint, mid-run
    done_steps = read_losses(killed) if os.path.exists(os.path.join(killed, "metrics.jsonl")) else {}
    if max(done_steps, default=0) >= 2 * EVERY + 2:
      break
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = max(read_losses(killed))
  assert before < STEPS, "the run finished before it could be killed"
  resumed = subprocess.run(command(killed, digits_dir, meta=train_meta), env=env(), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout

  a, b = read_losses(full), read_losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([b[s] for s in sorted(b)], [a[s] for s in sorted(a)])
  assert a[STEPS] < a[1]
  assert skips_logged(killed) == skips_logged(full)  # the skip counts are part of the checkpointed data state

  # The export is a released-layout checkpoint with its tokenizer: serve.py's loaders read it.
  import internvl_jax as ij
  model = ij.from_pretrained(os.path.join(killed, "export"))
  processor = ij.Processor.from_pretrained(os.path.join(killed, "export"))
  assert model.cfg.image_token_id == processor.tokenizer.image_token_id
  assert os.listdir(os.path.join(full, "tensorboard"))


def test_unknown_trainable_part_is_named(digits_dir, tmp_path):
  done = subprocess.run(command(str(tmp_path / "w"), digits_dir, "--config.trainable=('vit', 'mlp1')"),
                        env=env(), capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and "unknown trainable parts ['vit']" in done.stderr


@pytest.mark.parametrize("name", ["base", "digits", "internvl3_5_sft", "digits_mpo", "digits_gspo", "internvl3_5_mpo",
                                  "internvl3_5_gspo"])
def test_config_files_load(name):
  import importlib
  sys.path.insert(0, ROOT)
  cfg = importlib.import_module(f"configs.{name}").get_config()
  assert cfg.optim.lr > 0 and cfg.steps > 0 and set(cfg.trainable) <= {"vision_model", "mlp1", "language_model"}


ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\]", re.M)  # absl's INFO line prefix


def test_console_shows_progress_not_orbax_info(digits_dir, tmp_path):
  """A run that saves checkpoints, then its resume that restores one: the console holds our progress lines
  and none of orbax's INFO lines (dozens per save: checkpoint_manager.py, atomicity.py, ...)."""
  workdir = str(tmp_path / "w")

  def run(steps):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs/digits.py"),
           f"--workdir={workdir}", f"--config.data_root={digits_dir}", f"--config.steps={steps}",
           "--config.batch_size=2", "--config.data.max_tokens=64", "--config.data.max_tiles_per_row=1",
           "--config.checkpoint.every=1", "--config.log_every=1", "--config.eval.meta=", "--config.export=",
           "--config.tensorboard=False"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr

  for steps in (2, 3):  # saves, then restores and saves
    out, err = run(steps)
    assert f"step {steps}/{steps}  loss" in out
    assert ("resumed from" in out) == (steps == 3)
    info = ABSL_INFO.findall(out + "\n" + err)
    assert not info, f"absl INFO lines on the console, from {sorted(set(info))}"
    assert "checkpoint_manager" not in out + err and "atomicity" not in out + err


def test_orbax_filter_keeps_warnings_and_our_records():
  """orbax's INFO records are dropped; its warnings and errors, and every record of ours, pass."""
  import logging
  import orbax.checkpoint as ocp
  from internvl_jax.training import loop
  orbax_file = os.path.join(os.path.dirname(ocp.__file__), "checkpoint_manager.py")
  ours = os.path.join(ROOT, "internvl_jax", "training", "loop.py")

  def record(level, path, name="absl"):
    return logging.LogRecord(name, level, path, 1, "message", None, None)

  keep = loop.OrbaxInfoFilter().filter
  assert not keep(record(logging.INFO, orbax_file)) and not keep(record(logging.DEBUG, orbax_file))
  assert not keep(record(logging.INFO, "x.py", name="orbax.checkpoint"))
  assert keep(record(logging.WARNING, orbax_file)) and keep(record(logging.ERROR, orbax_file))
  assert keep(record(logging.INFO, ours)) and keep(record(logging.INFO, ours, name="internvl_jax.training.loop"))
