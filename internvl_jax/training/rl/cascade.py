"""The Cascade RL demo on the digits task (paper §2.3, Table 15): a deliberately short SFT run, then MPO on
pairs of the SFT model's own rollouts, then GSPO sampling the MPO model's rollouts, each stage starting from
the previous stage's export; prints held-out accuracy after each stage, in Table 15's shape, with each
stage's wall time.

  python -m internvl_jax.training.rl.cascade --workdir=runs/cascade            # builds data/digits if it is missing

Run from the repository root: the stage configs are read from `--configs` (default: configs/ under the
current directory), and they import each other as `configs.<name>`. The same stages by hand are three
train.py runs and the pair builder (README, "Cascade RL").
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

from internvl_jax.checkpoint.pretrained import from_pretrained
from internvl_jax.data import load_records
from internvl_jax.demos import digits
from internvl_jax.inputs.tokenizer import Tokenizer
from internvl_jax.training import loop, stages
from internvl_jax.training.rl import pairs

TASKS = (("digits_eval_single", "single digit"), ("digits_eval_sum", "sum of two"))


def load_config(name: str, configs: str = "configs"):
  """`get_config()` of the file <configs>/<name>.py, read by path."""
  path = os.path.join(configs, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {os.path.abspath(path)} not found: --configs names the folder of the "
                            f"configs/*.py files (default: configs/ under the current directory; run from the "
                            f"repository root)")
  spec = importlib.util.spec_from_file_location(f"_cascade_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != "configs":
      raise
    raise ModuleNotFoundError(f"{path} imports {e.name!r}: the config files import each other as configs.<name>, "
                              f"so run from the folder that holds configs/ (the repository root)",
                              name=e.name) from e
  return module.get_config()


def stage_config(name: str, data: str, configs: str = "configs", **fields):
  """<configs>/<name>.py with the data folder and `fields` (dotted paths) set."""
  cfg = load_config(name, configs)
  cfg.data_root = data
  for path, value in fields.items():
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def table(rows) -> str:
  """rows: (name, wall seconds, {task: accuracy}, overall) -> Table 15's layout (stages down, tasks across)."""
  head = f"{'Model':<24}{'Wall time':>11}" + "".join(f"{t:>15}" for _, t in TASKS) + f"{'Overall':>10}"
  lines = [head, "-" * len(head)]
  for name, seconds, acc, overall in rows:
    lines.append(f"{name:<24}{f'{int(seconds) // 60}m{int(seconds) % 60:02d}s':>11}"
                 + "".join(f"{100 * acc[k]:>15.1f}" for k, _ in TASKS) + f"{100 * overall:>10.1f}")
  return "\n".join(lines)


def run(workdir: str, data: str, *, sft_steps: int = 200, pair_prompts: int = 768, configs: str = "configs") -> list:
  """The three stages on the digits data in `data` (built when missing), configs from the folder `configs`.
  -> the table's rows."""
  for name in ("digits", "digits_mpo", "digits_gspo"):  # a missing or broken file fails now, not after SFT
    load_config(name, configs)
  if not os.path.exists(os.path.join(data, "build.json")):
    digits.build(data)
  rows, start = [], time.time()

  def stage(name, cfg, sub, seconds_before=0.0):
    t0 = time.time()
    last = stages.train(cfg, os.path.join(workdir, sub))
    acc = {k: last[f"eval_accuracy/{k}"] for k, _ in TASKS}
    rows.append((name, seconds_before + time.time() - t0, acc, last["eval_accuracy"]))
    print(table(rows), flush=True)
    return os.path.join(workdir, sub, "export")

  sft = stage(f"SFT ({sft_steps} steps)", stage_config("digits", data, configs, steps=sft_steps, **{
      "eval.every": sft_steps, "checkpoint.every": sft_steps}), "sft")

  t0 = time.time()
  mpo_cfg = stage_config("digits_mpo", data, configs, **{"model.checkpoint": sft, "data.meta": os.path.join(workdir, "pairs",
                                                                                              "meta.json")})
  model = from_pretrained(sft)
  processor = loop.make_processor(mpo_cfg, model.cfg, Tokenizer.from_pretrained(sft))
  info = pairs.build(model, processor, load_records(os.path.join(data, "train_meta.json"), limit=pair_prompts),
                     os.path.join(workdir, "pairs"), group_size=8, max_new_tokens=16, per_prompt=2, max_rows=128)
  print(f"pairs from the SFT model's rollouts: {json.dumps(info)}", flush=True)
  mpo = stage("+MPO", mpo_cfg, "mpo", seconds_before=time.time() - t0)
  stage("+GSPO (Cascade RL)", stage_config("digits_gspo", data, configs, **{"model.checkpoint": mpo}), "gspo")
  print(f"\nCascade RL on digits: held-out accuracy (%) after each stage; total {time.time() - start:.0f} s\n"
        + table(rows), flush=True)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/cascade")
  parser.add_argument("--data", default="data/digits", help="digits data folder (built when missing)")
  parser.add_argument("--sft_steps", type=int, default=200)
  parser.add_argument("--configs", default="configs",
                      help="the folder of configs/*.py (default: configs/ under the current directory)")
  args = parser.parse_args(argv)
  run(args.workdir, args.data, sft_steps=args.sft_steps, configs=args.configs)


if __name__ == "__main__":
  main()
