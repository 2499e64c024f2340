"""The ViCO demo (InternVL3.5-Flash, paper §3.3): a Visual Resolution Router that learns which tiles can be
compressed, on canvases where most tiles carry nothing.

Each image is a 2x2 canvas of `cell_px` cells (112x112 px at the digits tile size), so the Processor at
max_tiles=4, use_thumbnail=False, tile_size=cell_px cuts it into exactly one tile per cell. One or two random
cells hold a scikit-learn digit scan rendered as digits.py renders one scan into a tile; the other cells are
blank (white) or faint (low-contrast noise or a light-grey gradient, so "compress what is white" is not a
rule that scores). "Which digits are shown?" -> "Answer: 37" (the digits in row-major cell order). A tiny
Flash model should answer as well with the empty tiles at 4 tokens as at 16, and a trained router should
compress exactly those.

* `build_canvases`: images, JSONL and InternVL metas (`canvas_train`, `canvas_eval`), split by scan as
  digits.build splits (an eval scan never appears in a training canvas); the digits tokenizer is copied in,
  so the folder also works as `model.tokenizer`.
* `evaluate`: greedy accuracy and visual tokens per image, with or without routing, and each tile's decision.
* `draw_routing`: held-out canvases with every tile outlined by its decision; `table`: the comparison table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time

import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from internvl_jax.checkpoint.pretrained import from_pretrained
from internvl_jax.data import load_records
from internvl_jax.demos import digits
from internvl_jax.demos.digits import _ink, _record, _render, _rendered, split_scans
from internvl_jax.inference import engine as engine_lib
from internvl_jax.inputs.processor import pad_batch
from internvl_jax.inputs.tokenizer import Tokenizer
from internvl_jax.model import vir
from internvl_jax.training import evaluation, loop, stages
from internvl_jax.training.rl.cascade import load_config, stage_config

QUESTION = "<image>\nWhich digits are shown?"
GRID = 2  # cells per side
CELL_KINDS = ("digit", "blank", "faint")


def answer(labels) -> str:
  return "Answer: " + "".join(str(int(d)) for d in labels)


# ------------------------------------------------------------------------------------------- canvases

def _faint(rng: np.random.Generator, px: int) -> np.ndarray:
  """A light cell with no content: low-contrast noise or a smooth gradient in a random direction, never
  darker than the lightest tenth of a scan's ink range, so no stroke can be read into it."""
  if rng.random() < 0.5:
    cell = 244 + rng.normal(0, 5, (px, px))
  else:
    y, x = np.mgrid[0:px, 0:px] / (px - 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    cell = 255 - rng.uniform(12, 32) * ramp
  return np.clip(np.round(cell), 230, 255).astype(np.uint8)


def _canvas(scans, idx, rng, cell_px):
  """-> (RGB canvas, cells, scan indices in reading order)."""
  n_digits = int(rng.integers(1, 3))
  where = set(rng.choice(GRID * GRID, n_digits, replace=False).tolist())
  chosen = iter(rng.choice(idx, n_digits, replace=False).tolist())
  canvas = np.full((GRID * cell_px, GRID * cell_px, 3), 255, np.uint8)
  cells, used = [], []
  for k in range(GRID * GRID):
    r, c = divmod(k, GRID)
    box = (slice(r * cell_px, (r + 1) * cell_px), slice(c * cell_px, (c + 1) * cell_px))
    if k in where:
      s = next(chosen)
      canvas[box] = np.asarray(_render(_ink(scans[s]), cell_px))
      cells.append("digit")
      used.append(s)
    elif rng.random() < 0.5:
      cells.append("blank")
    else:
      canvas[box] = _faint(rng, cell_px)[..., None]
      cells.append("faint")
  return Image.fromarray(canvas, "RGB"), cells, used


def build_canvases(out_dir: str, *, digits_dir: str, seed: int = 0, train: int = 2000, eval: int = 200,
                   cell_px: int = 56) -> dict:
  """Write `images/canvas_<split>_NNNNN.png`, `canvas_<split>.jsonl`, `canvas_<split>_meta.json` and the digits
  tokenizer (from `digits_dir`, a `digits.build` folder) under out_dir; deterministic in every argument, and
  each split's canvases depend only on the seed and that split's count.

  -> {'out_dir', 'train_meta', 'eval_meta', 'tokenizer_dir', 'counts' (canvases and scans per split),
  'cells' ({split: {kind: n}}), 'non_digit_fraction' ({split: fraction of cells without a digit}),
  'cell_px', 'image_px', 'seed'}; also written to `canvas_build.json`."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  scans, labels = digits.images, digits.target
  # digits.build's defaults, so the held-out scans are the same ones the digits demo holds out
  train_idx, eval_idx = split_scans(labels, seed=seed, eval_fraction=0.2)
  out_dir = os.path.abspath(out_dir)
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  for name in os.listdir(image_dir):  # our own images only: out_dir may be the digits folder itself
    if re.fullmatch(r"canvas_(train|eval)_\d{5}\.png", name):
      os.remove(os.path.join(image_dir, name))

  tok = Tokenizer.from_pretrained(digits_dir)
  unk = tok.tok.token_to_id("<unk>")
  info = {"out_dir": out_dir, "tokenizer_dir": out_dir, "counts": {}, "cells": {}, "non_digit_fraction": {},
          "cell_px": cell_px, "image_px": GRID * cell_px, "seed": seed}
  for split_no, (split, idx, count) in enumerate((("train", train_idx, train), ("eval", eval_idx, eval))):
    rng = np.random.default_rng([seed, split_no])
    records = []
    for k in range(count):
      image, cells, used = _canvas(scans, idx, rng, cell_px)
      rid = f"canvas_{split}_{k:05d}"  # = the image's stem, which is all `load_records` keeps of a record
      image.save(os.path.join(image_dir, rid + ".png"))
      record = _record(rid, f"images/{rid}.png", QUESTION, answer(labels[used]), "canvas", used, labels[used])
      records.append({**record, "cells": cells})
    if records and unk is not None and unk in tok.encode(_rendered(records[0]) + answer(range(10))):
      raise ValueError(f"the digits tokenizer in {digits_dir} encodes the canvas conversation with <unk>")
    annotation = os.path.join(out_dir, f"canvas_{split}.jsonl")
    with open(annotation, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    info[f"{split}_meta"] = os.path.join(out_dir, f"canvas_{split}_meta.json")
    with open(info[f"{split}_meta"], "w") as f:
      json.dump({f"canvas_{split}": {"root": out_dir, "annotation": annotation, "repeat_time": 1,
                                     "data_augment": False, "length": len(records)}}, f, indent=2)
    kinds = [c for r in records for c in r["cells"]]
    info["counts"].update({split: count, f"{split}_scans": len(idx)})
    info["cells"][split] = {kind: kinds.count(kind) for kind in CELL_KINDS}
    info["non_digit_fraction"][split] = 1 - kinds.count("digit") / max(1, len(kinds))

  for name in ("tokenizer.json", "tokenizer_config.json"):
    source, target = os.path.join(digits_dir, name), os.path.join(out_dir, name)
    if os.path.abspath(source) != target:
      shutil.copyfile(source, target)
  with open(os.path.join(out_dir, "canvas_build.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


# ------------------------------------------------------------------------------------------- evaluation

@nnx.jit
def _p0(model, pixels):
  return model.flash_features(pixels)[2]


def _decisions(model, pixels, tiles_per_row) -> list[list[bool]]:
  """Each row's per-tile compress decisions, as `Engine.route` takes them: one ViT pass over the batch's
  tiles (padded to generate's tile bucket, so shapes stay few), `vir.route` on each row's own p0."""
  n = len(pixels)
  padded = np.zeros((engine_lib.bucket(n),) + pixels.shape[1:], np.float32)
  padded[:n] = pixels
  p0, out, first = np.asarray(_p0(model, padded)), [], 0
  for count in tiles_per_row:
    out.append([bool(b) for b in vir.route(p0[first:first + count], model.cfg.flash)])
    first += count
  return out


def _record_id(question: dict, k: int) -> str:
  if question.get("id"):
    return str(question["id"])
  images = question.get("images") or []
  return os.path.splitext(os.path.basename(images[0]))[0] if images and isinstance(images[0], str) else str(k)


def evaluate(model, processor, records, *, flash: bool, batch: int = 32, max_new_tokens: int = 8,
             scorer=evaluation.final_answer) -> dict:
  """Greedy answers to `records` (from `data.load_records`), scored by `scorer(prediction, reference)` against
  the gpt turn, with the ViR router on (flash=True) or every tile at full length. final_answer compares
  canonical numbers, so "Answer: 07" also accepts "7" (a canvas with a 0 first; `evaluation.exact` does not).

  -> {'accuracy', 'visual_tokens_per_image', 'visual_tokens_before' (means over records, one image each
  here), 'compressed_fraction' (compressed tiles / tiles), 'rows': [{'id', 'image', 'correct',
  'prediction', 'reference', 'compressed' (bool per tile)}]}."""
  tok = processor.tokenizer
  rows, stats = [], []
  for start in range(0, len(records), batch):  # one batch bucket per call, as Evaluator.answers does
    chunk = records[start:start + batch]
    samples = [processor(q["messages"], images=q["images"] or None) for q in chunk]
    padded = pad_batch(samples, tok.pad_id, side="left")
    ids, chunk_stats = engine_lib.generate(
        model, padded["input_ids"], padded["pixel_values"], attention_mask=padded["attention_mask"],
        max_new_tokens=max_new_tokens, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id, flash=flash,
        return_stats=True)
    tiles = [int(s["num_tiles"].sum()) for s in samples]
    if flash and padded["pixel_values"] is not None:
      decisions = _decisions(model, padded["pixel_values"], tiles)
    else:
      decisions = [[False] * n for n in tiles]
    for k, (q, row, s, d) in enumerate(zip(chunk, ids, chunk_stats, decisions)):
      if sum(d) != s["compressed_tiles"] or len(d) != s["tiles"]:  # the picture would show other decisions
        raise RuntimeError(f"row {start + k}: decisions {d} disagree with generate's routing {s}")
      text = tok.decode([int(i) for i in row if i not in (tok.pad_id, tok.eos_id)]).strip()
      rows.append({"id": _record_id(q, start + k), "image": (q["images"] or [None])[0],
                   "correct": bool(scorer(text, q["reference"])), "prediction": text,
                   "reference": q["reference"], "compressed": d})
    stats += chunk_stats
  mean = lambda key: float(np.mean([s[key] for s in stats])) if stats else 0.0
  tiles = sum(s["tiles"] for s in stats)
  return {"accuracy": float(np.mean([r["correct"] for r in rows])) if rows else 0.0,
          "visual_tokens_per_image": mean("visual_tokens_after"), "visual_tokens_before": mean("visual_tokens_before"),
          "compressed_fraction": sum(s["compressed_tiles"] for s in stats) / tiles if tiles else 0.0, "rows": rows}


# ------------------------------------------------------------------------------------------- picture

SCALE, PAD, CAPTION, LEGEND = 2, 8, 16, 36  # canvas magnification; gaps, caption and legend heights in px
KEPT, COMPRESSED = (0, 160, 0), (220, 0, 0)
MAX_CANVASES = 12


def draw_routing(records, decisions, path: str, *, columns: int = 4, tokens: tuple[int, int] = (16, 4)) -> str:
  """A grid of the first (up to 12) canvases, each tile outlined by its routing decision, captioned right or
  wrong, with a legend. records: with 'image' (`read_meta`) or 'images' (`load_records`) paths, or
  `evaluate` rows; decisions: `evaluate`'s rows (their 'compressed' and 'correct') or bool lists per tile
  (no verdict in the caption). Tiles are row-major on a square grid, as the Processor cuts a square canvas.
  Size: PAD + columns' * (W * SCALE + PAD) wide, PAD + rows * (H * SCALE + CAPTION + PAD) + LEGEND high, for
  canvases of W x H px. -> path."""
  n = min(len(records), len(decisions), MAX_CANVASES)
  if not n:
    raise ValueError("nothing to draw: no records or no decisions")
  images = [Image.open(r["image"] if r.get("image") else r["images"][0]).convert("RGB") for r in records[:n]]
  w, h = images[0].size
  cols = max(1, min(columns, n))
  tile_w, tile_h = w * SCALE, h * SCALE
  sheet = Image.new("RGB", (PAD + cols * (tile_w + PAD), PAD + math.ceil(n / cols) * (tile_h + CAPTION + PAD)
                            + LEGEND), "white")
  draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
  line = max(2, SCALE + 1)
  for k, (image, d) in enumerate(zip(images, decisions[:n])):
    mask = d["compressed"] if isinstance(d, dict) else d
    side = math.isqrt(len(mask))
    if side * side != len(mask):
      raise ValueError(f"canvas {k}: {len(mask)} tile decisions do not make a square grid")
    x0, y0 = PAD + (k % cols) * (tile_w + PAD), PAD + (k // cols) * (tile_h + CAPTION + PAD)
    sheet.paste(image.resize((tile_w, tile_h), Image.NEAREST), (x0, y0))
    cw, ch = tile_w / side, tile_h / side
    for t, squeezed in enumerate(mask):
      r, c = divmod(t, side)
      box = (round(x0 + c * cw), round(y0 + r * ch), round(x0 + (c + 1) * cw) - 1, round(y0 + (r + 1) * ch) - 1)
      draw.rectangle(box, outline=COMPRESSED if squeezed else KEPT, width=line)
    if isinstance(d, dict) and "correct" in d:
      # the default bitmap font has no glyphs beyond ASCII, and a random model's answers are anything
      said = re.sub(r"[^ -~]", "?", str(d.get("prediction", "")))
      caption = f"{'correct' if d['correct'] else 'incorrect'}: {said}"[:tile_w // 6]
      draw.text((x0, y0 + tile_h + 2), caption, fill=KEPT if d["correct"] else COMPRESSED, font=font)
  legend_y = sheet.height - LEGEND + 4
  draw.text((PAD, legend_y), f"red: compressed to {tokens[1]} tokens", fill=COMPRESSED, font=font)
  draw.text((PAD, legend_y + 14), f"green: kept at {tokens[0]} tokens", fill=KEPT, font=font)
  sheet.save(path)
  return path


# ------------------------------------------------------------------------------------------- table

def _wall(seconds) -> str:
  return "-" if seconds is None else f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _relative(value, first) -> str:
  return f"{100 * value / first:.1f}%" if first else "-"


def table(rows) -> str:
  """rows: (name, accuracy, visual tokens per image, wall seconds or None) -> an aligned table with tokens and
  accuracy relative to the first row, (a)."""
  width = max([24] + [len(str(r[0])) + 2 for r in rows])
  head = (f"{'Model':<{width}}{'Accuracy':>10}{'Tokens/image':>14}{'Tokens vs (a)':>15}{'Accuracy vs (a)':>17}"
          f"{'Wall time':>11}")
  lines = [head, "-" * len(head)]
  for name, acc, tokens, seconds in rows:
    lines.append(f"{name:<{width}}{100 * acc:>10.1f}{tokens:>14.1f}{_relative(tokens, rows[0][2]):>15}"
                 f"{_relative(acc, rows[0][1]):>17}{_wall(seconds):>11}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------- demo run
# The training stages (consistency training, router training) and their orchestration, run() and main(),
# go here.

def run(workdir: str, data: str = "data/digits", canvases: str = "data/digits_canvas", *, checkpoint: str = "",
        sft_steps: int = 600, configs: str = "configs", eval_limit: int = 200) -> list:
  """The whole demo: the digits SFT model (`checkpoint`, or trained here for `sft_steps` from the README
  config), SFT on the canvases at 16 tokens per tile (a), consistency training, router training; then (a),
  the Flash model with routing (b) and forced to 4 tokens everywhere (c) on `eval_limit` held-out canvases,
  as a table, and a picture of the routing decisions. -> the table's rows."""
  for name in ("digits", "digits_canvas", "digits_vico_consistency", "digits_vico_router"):
    load_config(name, configs)  # a missing or broken file fails now, not after training
  if not os.path.exists(os.path.join(data, "build.json")):
    digits.build(data)
  if not os.path.exists(os.path.join(canvases, "canvas_build.json")):
    build_canvases(canvases, digits_dir=data)
  times, start = {}, time.time()

  def train(name, sub, **fields):
    t0 = time.time()
    cfg = stage_config(name, canvases if name != "digits" else data, configs, **fields)
    stages.train(cfg, os.path.join(workdir, sub))
    times[sub] = time.time() - t0
    return os.path.join(workdir, sub, "export")

  if not checkpoint:
    checkpoint = train("digits", "digits", steps=sft_steps, **{"eval.meta": "", "checkpoint.every": sft_steps})
  sft = train("digits_canvas", "sft", **{"model.checkpoint": checkpoint})
  flash = train("digits_vico_consistency", "consistency", **{"model.checkpoint": sft})
  flash = train("digits_vico_router", "router", **{"model.checkpoint": flash, "vico.reference": sft})

  records = load_records(os.path.join(canvases, "canvas_eval_meta.json"), limit=eval_limit)
  plain = from_pretrained(sft)
  processor = loop.make_processor(load_config("digits_canvas", configs), plain.cfg, Tokenizer.from_pretrained(sft))
  results = [("(a) SFT, 16 tokens per tile", evaluate(plain, processor, records, flash=False), times["sft"])]
  results.append(("(b) Flash, routed", evaluate(from_pretrained(flash), processor, records, flash=True),
                  times["consistency"] + times["router"]))
  forced = from_pretrained(flash, flash={"rule": "absolute", "absolute_threshold": 0.0})
  results.append(("(c) Flash, 4 tokens per tile", evaluate(forced, processor, records, flash=True), None))
  rows = [(name, r["accuracy"], r["visual_tokens_per_image"], seconds) for name, r, seconds in results]
  picture = draw_routing(records, results[1][1]["rows"], os.path.join(workdir, "routing.png"))
  routed = results[1][1]
  print(f"\nViCO on digit canvases: {len(records)} held-out canvases, total {time.time() - start:.0f} s "
        f"(the digits SFT {times.get('digits', 0):.0f} s); (b) compressed {100 * routed['compressed_fraction']:.1f}% "
        f"of the tiles; routing decisions drawn in {picture}\n" + table(rows), flush=True)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/vico")
  parser.add_argument("--data", default="data/digits", help="digits data folder (built when missing)")
  parser.add_argument("--canvases", default="data/digits_canvas", help="canvas data folder (built when missing)")
  parser.add_argument("--checkpoint", default="", help="the digits SFT export (default: train it here)")
  parser.add_argument("--sft_steps", type=int, default=600)
  parser.add_argument("--eval_limit", type=int, default=200)
  parser.add_argument("--configs", default="configs",
                      help="the folder of configs/*.py (default: configs/ under the current directory)")
  args = parser.parse_args(argv)
  run(args.workdir, args.data, args.canvases, checkpoint=args.checkpoint, sft_steps=args.sft_steps,
      configs=args.configs, eval_limit=args.eval_limit)


if __name__ == "__main__":
  main()
