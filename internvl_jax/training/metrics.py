"""Where training metrics go: a console progress line, `metrics.jsonl`, and TensorBoard event files.

The console lines of a run (progress, evaluation tables, resumes, skipped data) go through the `console`
logger, 'internvl_jax.console': each message alone on stdout, not passed on to the root logger (where absl's
handler would prefix it and send it to stderr). Silence or redirect it as any logger, e.g.
`logging.getLogger("internvl_jax.console").setLevel(logging.WARNING)`.

Only process 0 writes; every process may call. JSONL lines are `{"step": n, "kind": "train" | "eval", ...}`
and are appended, so a resumed run continues the same file (a step logged twice — after a kill between a
log line and the next checkpoint — keeps both lines; readers take the last one per step).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax


class _Stdout(logging.StreamHandler):
  """Each record's message alone on the sys.stdout of the moment (a redirected or captured stdout gets it)."""

  def __init__(self):
    super().__init__()
    self.setFormatter(logging.Formatter("%(message)s"))

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):
    pass


console = logging.getLogger("internvl_jax.console")
if not console.handlers:
  console.addHandler(_Stdout())
  console.setLevel(logging.INFO)
  console.propagate = False


class MetricsWriter:

  def __init__(self, workdir: str, *, total_steps: int, tensorboard: bool = True):
    self.primary = jax.process_index() == 0
    self.total_steps = total_steps
    self._jsonl = self._tb = None
    self._start_time, self._start_step = time.time(), None
    if self.primary:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict, kind: str = "train") -> None:
    if not self.primary:
      return
    values = {k: float(v) if hasattr(v, "__float__") else v for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, float):
          self._tb.add_scalar(f"{kind}/{k}", v, step)
      self._tb.flush()

  def progress(self, step: int, values: dict) -> None:
    """`step 120/600  loss 1.234  lr 3.0e-04  1,234 tok/s  ETA 5m12s` on the console (stdout)."""
    if not self.primary:
      return
    if self._start_step is None:
      self._start_time, self._start_step = time.time(), step
    done = step - self._start_step
    elapsed = time.time() - self._start_time
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
    eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "--"
    console.info(f"step {step}/{self.total_steps}  loss {values['loss']:.4f}  lr {values.get('lr', 0.0):.2e}  "
                 f"{values.get('tokens_per_s', 0.0):,.0f} tok/s  ETA {eta_text}")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_losses(workdir: str) -> dict[int, float]:
  """step -> training loss from `metrics.jsonl`, the last line per step winning (a killed and resumed run
  re-does the steps after its checkpoint)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r["kind"] == "train":
        out[r["step"]] = r["loss"]
  return out
