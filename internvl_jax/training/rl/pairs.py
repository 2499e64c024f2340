"""MPO's preference pairs: the MMPR-style JSONL reader, the MPO batch, and pairs built from the model's own
rollouts (correct vs incorrect under the reward).

Format (MMPR, InternVL's MPO data): a meta JSON as for SFT, {name: {"root", "annotation", "repeat_time"}},
whose JSONL lines are {"image": "a.jpg" | ["a.jpg", ...] (relative to root; absent = text only),
"question": "<image>\\n...", "chosen": "...", "rejected": "..."}. A question without an `<image>` placeholder
gets one per image in front, as the official MPO reader does.

  python -m internvl_jax.training.rl.pairs --checkpoint=runs/sft/export --meta=data/digits/train_meta.json \\
      --out=data/digits/pairs --max_tiles=1 --no-thumbnail
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np

from internvl_jax.data import meta as meta_lib
from internvl_jax.data import packing, samples
from internvl_jax.training.rl import rollout
from internvl_jax.inference.engine import engine_for
from internvl_jax.checkpoint.pretrained import from_pretrained
from internvl_jax.data import load_records
from internvl_jax.inputs.processor import Processor

FIELDS = ("question", "chosen", "rejected")


def load_pairs(meta) -> tuple[list[dict], dict]:
  """Every valid pair of the meta's datasets (repeat_time as in SFT, seed 0), as {'where', 'root', 'image'
  (list), 'question', 'chosen', 'rejected'} -> (pairs, skipped: {reason: [where, ...]}). A line that is not
  a JSON object, lacks a field, has an empty or non-string one, equal chosen and rejected, or names a
  missing image is skipped and reported here, not halfway through training."""
  pairs, skipped = [], collections.defaultdict(list)
  for spec in meta_lib.load_meta(meta):
    if spec.kind != "jsonl":
      raise ValueError(f"meta dataset {spec.name}: preference pairs are read from JSONL annotations")
    source = meta_lib.JsonlSource(spec)
    found = []
    for i in range(len(source)):
      where = source.where(i)
      try:
        record = source.record(i)
      except ValueError as e:
        skipped["bad_json"].append(f"{where}: {e}")
        continue
      bad = [f for f in FIELDS if not isinstance(record.get(f), str) or not record[f].strip()]
      if bad:
        skipped["bad_record"].append(f"{where}: field(s) {bad} missing or empty")
        continue
      if record["chosen"].strip() == record["rejected"].strip():
        skipped["bad_record"].append(f"{where}: chosen equals rejected")
        continue
      images = samples._images_of(record)
      missing = [x for x in images if isinstance(x, str) and not os.path.exists(os.path.join(spec.root, x))]
      if missing:
        skipped["missing_file"].append(f"{where}: image {os.path.join(spec.root, missing[0])} not found")
        continue
      found.append({"where": where, "root": spec.root, "image": images,
                    **{f: record[f] for f in FIELDS}})
    rng = np.random.default_rng(meta_lib.name_seed(spec.name))
    pairs.extend(found[j] for j in meta_lib.repeat_indices(len(found), spec.repeat_time, rng))
  return pairs, dict(skipped)


def pair_samples(pair: dict, *, processor, max_tokens: int, max_tiles: int):
  """One pair -> (chosen, rejected) training samples (labels on the reply only). Raises samples.SampleError
  (reason, message) for an image that cannot be read or a row that would be too long."""
  rng = np.random.default_rng(0)
  out = []
  for reply in (pair["chosen"], pair["rejected"]):
    record = {"image": pair["image"], "conversations": [{"from": "human", "value": pair["question"]},
                                                        {"from": "gpt", "value": reply}]}
    out.append(samples.to_sample(0, samples.process_record(
        record, processor=processor, root=pair["root"], rng=rng, jpeg_augment=False, num_frames=(8, 8),
        max_tokens=max_tokens, max_tiles=max_tiles)))
  return tuple(out)


def mpo_batch(rows: list, *, max_tokens: int, max_tiles: int, pad_id: int, tile_size: int) -> dict:
  """P (chosen, rejected) sample pairs -> the `mpo.mpo_step` batch without ref_logps: 2P unpacked rows of
  max_tokens, the chosen replies first, then the rejected ones."""
  batch = packing.make_batch([[c] for c, _ in rows] + [[r] for _, r in rows], batch_size=2 * len(rows),
                             max_tokens=max_tokens, max_tiles=max_tiles, pad_id=pad_id, tile_size=tile_size)
  batch.pop("num_tiles")
  return batch


def pairs_from_rollouts(rolls: rollout.Rollouts, correct: np.ndarray, *, per_prompt: int = 1) -> list[dict]:
  """Up to `per_prompt` (chosen, rejected) pairs per prompt: a correct response against an incorrect one
  (distinct texts), prompts with both kinds only. -> MMPR lines (image as an absolute path)."""
  out = []
  for i, q in enumerate(rolls.questions):
    good = list(dict.fromkeys(t for t, c in zip(rolls.texts[i], correct[i]) if c and t))
    bad = list(dict.fromkeys(t for t, c in zip(rolls.texts[i], correct[i]) if not c and t))
    user = [m for m in q["messages"] if m.get("from", m.get("role")) in ("human", "user")]
    if len(user) != 1 or not all(isinstance(x, str) for x in q["images"]):
      continue  # MMPR lines are single-turn questions about image files
    question = user[0].get("value", user[0].get("content"))
    for chosen, rejected in list(zip(good, bad))[:per_prompt]:
      out.append({"id": f"{q.get('dataset', 'data')}-{i}-{len(out)}", "image": q["images"],
                  "question": question, "chosen": chosen, "rejected": rejected, "reference": q["reference"]})
  return out


def build(model, processor, questions: list, out_dir: str, *, group_size: int = 8, max_new_tokens: int = 64,
          temperature: float = 1.0, per_prompt: int = 1, reward: str = "accuracy", seed: int = 0,
          max_rows: int = 64) -> dict:
  """Sample group_size responses per question from `model`, score them with REWARDS[reward], and write the
  pairs to out_dir/pairs.jsonl with out_dir/meta.json (MMPR format). -> counts and rollout accuracy."""
  rolls = rollout.sample(model, engine_for(model), processor, questions, group_size=group_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, max_rows=max_rows)
  correct = rolls.score({reward: 1.0}) > 0.5
  lines = pairs_from_rollouts(rolls, correct, per_prompt=per_prompt)
  os.makedirs(out_dir, exist_ok=True)
  annotation = os.path.abspath(os.path.join(out_dir, "pairs.jsonl"))
  with open(annotation, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump({"own_rollouts": {"root": "/", "annotation": annotation, "repeat_time": 1,
                                "length": len(lines)}}, f, indent=2)
  info = {"questions": len(rolls.questions), "rollouts": int(correct.size), "pairs": len(lines),
          "rollout_accuracy": float(correct.mean()) if correct.size else 0.0,
          "all_correct": int(correct.all(1).sum()), "all_wrong": int((~correct).all(1).sum())}
  with open(os.path.join(out_dir, "build.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="MPO pairs from a model's own rollouts (MMPR-style JSONL)")
  parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (released layout or train.py export)")
  parser.add_argument("--meta", required=True, help="InternVL meta JSON of the questions (last gpt turn = reference)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--limit", type=int, default=None, help="questions to use (default: all)")
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--per_prompt", type=int, default=1)
  parser.add_argument("--max_tiles", type=int, default=12)
  parser.add_argument("--no-thumbnail", dest="thumbnail", action="store_false")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  model = from_pretrained(args.checkpoint)
  processor = Processor.from_pretrained(args.checkpoint, max_tiles=args.max_tiles, use_thumbnail=args.thumbnail)
  info = build(model, processor, load_records(args.meta, limit=args.limit), args.out, group_size=args.group,
               max_new_tokens=args.max_new_tokens, temperature=args.temperature, per_prompt=args.per_prompt,
               seed=args.seed)
  print(json.dumps(info))


if __name__ == "__main__":
  main()
