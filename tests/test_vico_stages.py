"""The ViCO stages through train.py: consistency training turns a plain checkpoint into a Flash one (mlp2 and
the router at random init, the policy equal to the reference on the 16-token path at the first step), router
training changes only the router, and a router run resumed from its checkpoint repeats the uninterrupted
run, τ window included."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import digits_setup

from internvl_jax.checkpoint import pretrained, safetensors_io
from internvl_jax.demos import vico as vico_demo
from internvl_jax.model.internvl import init_model
from internvl_jax.training import loop
from internvl_jax.training.metrics import read_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(config, workdir, data, *extra):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, 'configs', config)}",
         f"--workdir={workdir}", f"--config.data_root={data}", "--config.log_every=1", "--config.batch_size=2",
         "--config.data.max_tokens=128", "--config.eval.generate=2", "--config.eval.max_batches=1",
         "--config.eval.every=1000", *extra]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout + done.stderr


def _lines(workdir):
  return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if '"train"' in x]


def _tensors(folder):
  ckpt = safetensors_io.Checkpoint(folder)
  return {k: np.asarray(ckpt.view(k)[...]) for k in ckpt.keys()}


def test_vico_stages_through_train_py(digits_dir, tmp_path):
  canvases = str(tmp_path / "canvas")
  vico_demo.build_canvases(canvases, digits_dir=digits_dir, train=24, eval=4)
  _, model_cfg, _ = digits_setup(digits_dir)
  plain = str(tmp_path / "plain")
  loop.export(init_model(model_cfg, seed=0), plain, digits_dir)
  assert not pretrained.is_flash_checkpoint(plain)

  with pytest.raises(AssertionError, match="list 'mlp2' in trainable"):
    _train("digits_vico_consistency.py", str(tmp_path / "bad"), canvases, f"--config.model.checkpoint={plain}",
           "--config.steps=1", "--config.trainable=('vision_model','mlp1','language_model')")

  first = str(tmp_path / "consistency")
  out = _train("digits_vico_consistency.py", first, canvases, f"--config.model.checkpoint={plain}",
               "--config.steps=2")
  assert "has no ViR: mlp2 and the router start from random init" in out and "step 2/2" in out
  lines = _lines(first)
  assert {"kl", "kl/compressed", "kl/full", "compressed_fraction"} <= set(lines[0])
  assert lines[0]["kl/full"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference ...
  assert lines[0]["kl/compressed"] > 1e-3  # ... except through the new, random mlp2
  assert pretrained.is_flash_checkpoint(os.path.join(first, "export"))

  second = str(tmp_path / "router")
  args = (f"--config.model.checkpoint={first}/export", f"--config.vico.reference={plain}", "--config.steps=4",
          "--config.checkpoint.every=2", "--config.vico.window=64")
  with pytest.raises(AssertionError, match="needs config.vico.reference"):
    _train("digits_vico_router.py", str(tmp_path / "bad2"), canvases, *args[:1], "--config.steps=1")
  out = _train("digits_vico_router.py", second, canvases, *args)
  assert "step 4/4" in out and "router: tau" in out
  lines = _lines(second)
  assert {"tau", "router_accuracy", "compressed_fraction", "kl"} <= set(lines[0])
  before, after = _tensors(os.path.join(first, "export")), _tensors(os.path.join(second, "export"))
  assert set(before) == set(after)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(".pooling_before_gating." in f".{k}" or ".gating." in f".{k}" for k in changed), changed

  again = str(tmp_path / "router_again")  # resume from step 2: steps 3 and 4 (loss and τ) repeat exactly
  shutil.copytree(second, again)
  shutil.rmtree(os.path.join(again, "checkpoints", "4"))
  os.remove(os.path.join(again, "metrics.jsonl"))
  assert "resumed from" in _train("digits_vico_router.py", again, canvases, *args)
  full, resumed = read_losses(second), read_losses(again)
  assert sorted(resumed) == [3, 4]
  np.testing.assert_array_equal([resumed[3], resumed[4]], [full[3], full[4]])
  np.testing.assert_array_equal([x["tau"] for x in _lines(again)], [x["tau"] for x in lines[2:]])
