"""Periodic evaluation on held-out data: the square-averaged loss, and answer accuracy where it can be checked.

Accuracy: the first `eval.generate` held-out samples (InternVL format, from `eval.meta`) are answered greedily
by the current parameters; the answer to the last human turn is scored against the sample's last gpt turn
with a scorer from `SCORERS`, per dataset of the meta file.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import jax
import numpy as np
from flax import nnx

from internvl_jax import data as data_lib
from internvl_jax.inference.engine import generate
from internvl_jax.training import sft
from internvl_jax.inputs.processor import pad_batch

_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:：]?", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LETTER = re.compile(r"\s*\(?([A-Z])\)?[.)]?\s*")


def _canonical(number: str) -> str:
  try:
    value = Decimal(number)
  except InvalidOperation:
    return number
  return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def extract_answer(text: str) -> str | None:
  """The final answer of a reply: the last `\\boxed{...}`; else the first number after the last "Answer:" /
  "answer is" (any case); else the last number in the text; else a lone multiple-choice letter ("B", "(B)").
  Numbers are canonical ("08", "8.0" -> "8"); None when nothing answer-like is found."""
  if not text:
    return None
  boxed = _BOXED.findall(text)
  if boxed:
    inner = boxed[-1].strip()
    return _canonical(inner) if _NUMBER.fullmatch(inner) else inner
  marks = list(_ANSWER.finditer(text))
  if marks:
    found = _NUMBER.search(text, marks[-1].end())
    if found:
      return _canonical(found.group())
    letter = re.match(r"\s*\(?([A-Z])\b", text[marks[-1].end():])
    if letter:
      return letter.group(1)
  numbers = _NUMBER.findall(text)
  if numbers:
    return _canonical(numbers[-1])
  letter = _LETTER.fullmatch(text)
  return letter.group(1) if letter else None


def final_answer(prediction: str, reference: str) -> bool:
  """Whether the prediction's final answer equals the reference's (see `extract_answer`)."""
  want = extract_answer(reference)
  if want is None:
    raise ValueError(f"reference {reference!r} holds no checkable answer")
  return extract_answer(prediction) == want


def exact(prediction: str, reference: str) -> bool:
  return prediction.strip() == reference.strip()


SCORERS = {"final_answer": final_answer, "exact": exact}


def accuracy_table(records) -> str:
  """(kind, correct) pairs -> a table of kind, n and accuracy %, kinds in first-seen order, then 'all'."""
  counts: dict[str, list[int]] = {}
  for kind, correct in records:
    c = counts.setdefault(str(kind), [0, 0])
    c[0], c[1] = c[0] + 1, c[1] + bool(correct)
  if counts:
    counts["all"] = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
  width = max([4] + [len(k) for k in counts])
  lines = [f"{'kind':<{width}}  {'n':>6}  {'accuracy':>8}"]
  lines += [f"{k:<{width}}  {n:>6}  {100 * ok / n:>7.1f}%" for k, (n, ok) in counts.items()]
  return "\n".join(lines)


@nnx.jit(static_argnames="loss_chunk")
def _eval_terms(model, batch, loss_chunk):
  return sft.next_token_terms(model, batch, loss_chunk=loss_chunk)[0]


class Evaluator:

  def __init__(self, cfg, processor, local_rows: int, mesh):
    self.cfg, self.processor, self.local_rows, self.mesh = cfg, processor, local_rows, mesh
    self.data_lib = data_lib
    if cfg.eval.scorer not in SCORERS:
      raise ValueError(f"config.eval.scorer={cfg.eval.scorer!r}; known: {sorted(SCORERS)}")
    self.scorer = SCORERS[cfg.eval.scorer]
    self.questions = data_lib.load_records(cfg.eval.meta, limit=cfg.eval.generate) if cfg.eval.generate else []

  def loss(self, model) -> dict:
    ce = w = n = 0.0
    batches = self.data_lib.make_eval_iterator(self.cfg.eval.meta, self.cfg.data, self.processor,
                                               batch_size=self.local_rows, process_index=jax.process_index(),
                                               process_count=jax.process_count())
    for i in range(self.cfg.eval.max_batches):
      local = next(batches, None)
      if local is None:
        if jax.process_count() == 1:
          break
        local = batches.empty_batch()  # every host runs the same number of (collective) steps
      with jax.set_mesh(self.mesh):
        terms = _eval_terms(model, sft.global_batch(local, self.mesh), self.cfg.get("loss_chunk", 0))
      c, ws, k = (float(t) for t in jax.device_get(terms))
      ce, w, n = ce + c, w + ws, n + k
    batches.close()
    return {"loss": ce / max(w, 1e-6), "tokens": n}

  def answers(self, model) -> list[tuple[str, bool, str, str]]:
    """-> (dataset, correct, prediction, reference) for each held-out question."""
    tok = self.processor.tokenizer
    out = []
    for start in range(0, len(self.questions), 32):  # 32 rows per generate call (one bucket, few programs)
      chunk = self.questions[start:start + 32]
      samples = [self.processor(q["messages"], images=q["images"] or None) for q in chunk]
      batch = pad_batch(samples, tok.pad_id, side="left")
      ids = generate(model, batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                     max_new_tokens=self.cfg.eval.max_new_tokens, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id,
                     flash=False)  # the 256-token path training changes (a Flash model's router is frozen)
      for q, row in zip(chunk, ids):
        text = tok.decode([int(i) for i in row if i not in (tok.pad_id, tok.eos_id)]).strip()
        out.append((q["dataset"], self.scorer(text, q["reference"]), text, q["reference"]))
    return out

  def run(self, model, step: int) -> dict:
    metrics = self.loss(model)
    table = f"eval at step {step}: held-out loss {metrics['loss']:.4f}"
    if self.questions and jax.process_count() == 1:  # generation drives one process's devices (issue 7: all)
      answers = self.answers(model)
      records = [(d, c) for d, c, _, _ in answers]
      metrics["accuracy"] = float(np.mean([c for _, c in records]))
      for kind in sorted({d for d, _ in records}):
        metrics[f"accuracy/{kind}"] = float(np.mean([c for d, c in records if d == kind]))
      table += "\n" + accuracy_table(records)
    return {"metrics": metrics, "table": table}
