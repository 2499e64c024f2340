"""The Evaluator that train.py runs (held-out loss and the accuracy table it prints) against a hand
computation on a tiny random model: one forward pass per held-out sample with the cross-entropy in float64
numpy, and greedy answers by repeated full forward passes (no KV cache, no batching; ids right-padded to one
width, which causal attention keeps out of the positions read)."""
import json
import os

import jax
import numpy as np
import pytest
from conftest import digits_setup

from internvl_jax import sharding
from internvl_jax.training import evaluation
from internvl_jax.training import loop as trainer
from internvl_jax.model.internvl import forward
from internvl_jax.inputs.labels import IGNORE

MAX_NEW = 5
WIDTH = 128  # every forward pass here right-pads its ids to this width: one compilation; causal attention
             # keeps the padding out of the positions read


def logits_of(model, ids, pixels) -> np.ndarray:
  padded = np.zeros((1, WIDTH), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(forward(model, padded, pixels)[0, :len(ids)], np.float64)


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
  """The digits config on a held-out set of 3 single-digit and 4 sum questions; a random tiny model."""
  here = tmp_path_factory.mktemp("eval")
  meta = json.load(open(os.path.join(digits_dir, "eval_meta.json")))
  for name, keep in (("digits_eval_single", 3), ("digits_eval_sum", 4)):
    with open(meta[name]["annotation"]) as f:
      lines = f.readlines()[:keep]
    meta[name].update(annotation=str(here / f"{name}.jsonl"), length=keep)
    with open(meta[name]["annotation"], "w") as f:
      f.writelines(lines)
  with open(here / "meta.json", "w") as f:
    json.dump(meta, f)
  cfg, model_cfg, processor = digits_setup(digits_dir)
  cfg.eval.update(meta=str(here / "meta.json"), generate=100, max_batches=100, max_new_tokens=MAX_NEW,
                  scorer="exact")
  cfg.data.max_tokens = 96  # rows of 96 tokens: the 7 samples pack into several rows and batches
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  model = trainer.initial_model(cfg, model_cfg, mesh)
  return cfg, processor, mesh, model


def greedy(model, processor, question) -> str:
  tok = processor.tokenizer
  sample = processor(question["messages"], images=question["images"] or None)
  ids = list(sample["input_ids"])
  for _ in range(MAX_NEW):
    nxt = int(np.argmax(logits_of(model, ids, sample["pixel_values"])[-1]))
    if nxt == tok.eos_id:
      break
    ids.append(nxt)
  return tok.decode(ids[len(sample["input_ids"]):]).strip()


def test_held_out_loss_and_accuracy_table_equal_a_hand_computation(run):
  cfg, processor, mesh, model = run
  questions = evaluation.Evaluator(cfg, processor, 2, mesh).questions
  assert [q["dataset"] for q in questions] == ["digits_eval_single", "digits_eval_sum"] * 3 + ["digits_eval_sum"]

  # Held-out loss: sum over every held-out sample of CE x loss weight / sum of the weights (square averaging).
  from internvl_jax.data import meta as meta_lib
  ce = w = n = 0.0
  for spec in meta_lib.load_meta(cfg.eval.meta):
    for line in open(spec.annotation):
      rec = json.loads(line)
      s = processor([{"from": t["from"], "value": t["value"]} for t in rec["conversations"]],
                    images=[os.path.join(spec.root, rec["image"])], train=True)
      logits = logits_of(model, s["input_ids"], s["pixel_values"])[:-1]
      labels, weights = np.asarray(s["labels"])[1:], np.asarray(s["loss_weights"])[1:]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      keep = labels != IGNORE
      ce += -(logp[keep, labels[keep]] * weights[keep]).sum()
      w += weights[keep].sum()
      n += keep.sum()

  # Answers: half of the references are set to what the model answers (so `exact` scores them right).
  preds = [greedy(model, processor, q) for q in questions]
  for i, q in enumerate(questions):
    if i % 2 == 0:
      q["reference"] = preds[i]
  ev = evaluation.Evaluator(cfg, processor, 2, mesh)
  ev.questions = questions
  result = ev.run(model, step=7)
  m = result["metrics"]
  np.testing.assert_allclose(m["loss"], ce / w, rtol=2e-5)
  assert m["tokens"] == n
  right = [p == q["reference"] for p, q in zip(preds, questions)]
  assert sum(right) >= 4  # the ones set above (a wrong one could also match by chance)
  by = {d: [r for r, q in zip(right, questions) if q["dataset"] == d]
        for d in ("digits_eval_single", "digits_eval_sum")}
  assert m["accuracy"] == pytest.approx(np.mean(right))
  for d, rs in by.items():
    assert m[f"accuracy/{d}"] == pytest.approx(np.mean(rs))
  lines = result["table"].splitlines()
  assert lines[0] == f"eval at step 7: held-out loss {ce / w:.4f}"
  assert lines[1].split() == ["kind", "n", "accuracy"]
  assert lines[2].split() == ["digits_eval_single", "3", f"{100 * np.mean(by['digits_eval_single']):.1f}%"]
  assert lines[3].split() == ["digits_eval_sum", "4", f"{100 * np.mean(by['digits_eval_sum']):.1f}%"]
  assert lines[4].split() == ["all", "7", f"{100 * np.mean(right):.1f}%"]
