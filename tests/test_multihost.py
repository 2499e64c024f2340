"""train.py as a 2-process job on 127.0.0.1 (jax.distributed + gloo CPU collectives, 2 simulated devices per
process): each process reads only its own shard of the data, the job checkpoints, is restarted, restores and
continues; its losses equal a 1-process run (4 devices) over the same global batches."""
import json
import os
import subprocess
import sys

import numpy as np

from internvl_jax.training.metrics import read_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir, data, steps):
  # pack=False: one sample per row, so a global batch holds the same samples however the hosts split the
  # stream (host i reads positions i, i + 2, ...; one process reads them all in order).
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs/digits.py"),
          f"--workdir={workdir}", f"--config.data_root={data}", f"--config.steps={steps}", "--config.batch_size=4",
          "--config.data.pack=False", "--config.data.max_tokens=64", "--config.data.max_tiles_per_row=1",
          "--config.checkpoint.every=3", "--config.log_every=1", "--config.eval.generate=0",
          "--config.eval.every=1000", "--config.eval.max_batches=1", "--config.export=", "--config.tensorboard=False",
          # A constant learning rate: the 3-step and the 6-step runs then share one schedule.
          "--config.optim.warmup=0", "--config.optim.final_lr_fraction=1.0", "--config.optim.lr=1e-3"]


def run_job(coordinated, workdir, data, steps, processes):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}"}
  if processes == 1:
    done = subprocess.run(command(workdir, data, steps), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [done.stdout]
  results = coordinated(lambda port: [(command(workdir, data, steps), {
      **env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
      "JAX_PROCESS_ID": str(i)}) for i in range(processes)], timeout=600)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  return [out for _, out, _ in results]


def losses(workdir):
  out = read_losses(workdir)
  return [out[s] for s in sorted(out)]


def test_two_processes_checkpoint_restore_and_match_one(coordinated, digits_dir, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  run_job(coordinated, one, digits_dir, 6, processes=1)
  first = run_job(coordinated, two, digits_dir, 3, processes=2)  # stops after its checkpoint at step 3
  assert all("step 3/3" in out for out in first[:1])
  # Every process wrote its own data-iterator state, and only its own rows were read.
  data_dir = os.path.join(two, "checkpoints", "3", "data")
  files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
  assert files == ["process_0-of-2.json", "process_1-of-2.json"]
  states = [json.load(open(os.path.join(data_dir, f))) for f in files]
  assert [s["process_index"] for s in states] == [0, 1] and all(s["next"] == 6 for s in states)
  second = run_job(coordinated, two, digits_dir, 6, processes=2)  # the same command with more steps: restores and goes on
  assert all("resumed from" in out for out in second)
  np.testing.assert_allclose(losses(two), losses(one), rtol=2e-5)
  assert len(losses(one)) == 6
