"""Handwritten digits as an InternVL training set: the README demo's data, tokenizer and answer checking.

scikit-learn's `load_digits` (1797 real 8x8 scans, grey levels 0..16, shipped with the package) becomes
InternVL-format data on disk, small enough to train a tiny model from scratch on a CPU:

* `images/` PNGs, dark ink on white, `image_px` square (default 56, the demo's tile size, so the
  processor's resize is the identity). `scan_NNNN.png` shows one scan; `sum_<split>_NNNNN.png` shows two
  scans side by side, vertically centred in a square canvas so that a one-tile processor (max_tiles=1)
  keeps both digits' aspect ratio instead of squashing a 2:1 strip.
* Two tasks per split, one JSONL each: `single` ("Which digit is this?" -> "7") and `sum` ("What is the
  sum of the two digits?" -> "3 + 5 = 8. Answer: 8"). Lines carry `kind`, `scans` (indices into
  `load_digits`) and `digits` (their labels) beside InternVL's `id`/`image`/`conversations`.
* Train and eval are split by scan (stratified by label, seeded): an eval scan never appears in a training
  image, neither alone nor in a pair.
* `train_meta.json` / `eval_meta.json` in InternVL's meta format, one dataset per task
  (`digits_<split>_single`, `digits_<split>_sum`); `root` and `annotation` are absolute paths.
* `tokenizer.json` + `tokenizer_config.json`: a character-level BPE trained on the rendered training
  conversations (`internvl2_5` ChatML with the official default system message), so every fixed piece of
  text, the long system message included, collapses to one token; digits are always single tokens.
* `build.json`: what `build` returns.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import string

import numpy as np
from PIL import Image

from internvl_jax.training import evaluation
from internvl_jax.inputs.conversation import IMG_CONTEXT, IMG_END, IMG_START, get_template, image_tokens
from internvl_jax.inputs.processor import Processor
from internvl_jax.inputs.tokenizer import Tokenizer

SINGLE_QUESTION = "<image>\nWhich digit is this?"
SUM_QUESTION = "<image>\nWhat is the sum of the two digits?"
TEMPLATE = "internvl2_5"
# Specials first so their ids do not move when the data (and so the learned merges) change.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, "<unk>")
THINK_TOKENS = ("<think>", "</think>")  # added but not special, as in Qwen3: decoding keeps them


def sum_answer(a: int, b: int) -> str:
  return f"{a} + {b} = {a + b}. Answer: {a + b}"


# ------------------------------------------------------------------------------------------- images

def _ink(scan: np.ndarray) -> np.ndarray:
  """8x8 grey levels 0..16 -> uint8 dark ink (0) on white (255)."""
  return (255 - np.round(scan * (255 / 16))).astype(np.uint8)


def _render(canvas: np.ndarray, px: int) -> Image.Image:
  """Area resampling of a square grey canvas to px x px RGB: exact pixel replication when px is a multiple
  of the canvas, and no uneven 3-or-4 px columns when it is not (nearest up to the lcm, box down)."""
  n = canvas.shape[0]
  big = math.lcm(n, px)
  image = Image.fromarray(canvas, "L").resize((big, big), Image.NEAREST)
  if big != px:
    image = image.resize((px, px), Image.BOX)
  return image.convert("RGB")


def _pair_canvas(left: np.ndarray, right: np.ndarray) -> np.ndarray:
  canvas = np.full((16, 16), 255, np.uint8)
  canvas[4:12, :8], canvas[4:12, 8:] = _ink(left), _ink(right)
  return canvas


# ------------------------------------------------------------------------------------------- data

def _record(rid, image, question, answer, kind, scans, labels):
  return {"id": rid, "image": image, "kind": kind, "scans": [int(s) for s in scans],
          "digits": [int(d) for d in labels],
          "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _pairs(indices: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """`count` distinct ordered pairs of distinct scans from `indices`."""
  if count > len(indices) * (len(indices) - 1):
    raise ValueError(f"{count} pairs asked of {len(indices)} scans")
  seen, out = set(), []
  while len(out) < count:
    a, b = rng.choice(indices, 2, replace=False)
    if (a, b) not in seen:
      seen.add((a, b))
      out.append((int(a), int(b)))
  return out


def split_scans(labels: np.ndarray, *, seed: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Scan indices (train, eval), stratified by label so every digit is held out in proportion."""
  if not 0 < eval_fraction < 1:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  from sklearn.model_selection import train_test_split
  train, test = train_test_split(np.arange(len(labels)), test_size=eval_fraction, random_state=seed,
                                 stratify=labels)
  return np.sort(train), np.sort(test)


def _rendered(record: dict) -> str:
  """The training text the chat template makes of a record (image placeholder already expanded)."""
  messages = [{"role": "user" if m["from"] == "human" else "assistant",
               "content": m["value"].replace("<image>", image_tokens(1, 1))} for m in record["conversations"]]
  return get_template(TEMPLATE).render(messages, add_generation_prompt=False)


# ------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], *, vocab_limit: int = 512):
  """A `tokenizers` BPE over characters (not bytes: the system message's CJK characters would cost three
  byte tokens each before any merge). Pre-tokenisation cuts only after each newline and around each digit,
  so fixed phrases merge whole while numbers stay digit by digit ("12" = "1", "2"). Characters outside
  printable ASCII and the training text encode as <unk>."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\n"), behavior="merged_with_previous"),
      pre_tokenizers.Digits(individual_digits=True)])
  tok.decoder = decoders.Fuse()  # tokens are plain text pieces; the default decoder would add spaces
  alphabet = sorted((set(string.printable) - set("\t\r\x0b\x0c")) | set("".join(texts)))
  trainer = trainers.BpeTrainer(vocab_size=vocab_limit, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                limit_alphabet=len(alphabet), show_progress=False)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tok.train_from_iterator(texts, trainer=trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
  if tok.get_vocab_size(with_added_tokens=True) > vocab_limit:
    raise ValueError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, over {vocab_limit}")
  return tok


def _save_tokenizer(tok, out_dir: str) -> None:
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                     "single_word": False, "special": t not in THINK_TOKENS}
           for t in SPECIAL_TOKENS + THINK_TOKENS}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
            "model_max_length": 4096, "clean_up_tokenization_spaces": False}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)


# ------------------------------------------------------------------------------------------- build

def build(out_dir: str, *, seed: int = 0, eval_fraction: float = 0.2, image_px: int = 56, train_pairs: int = 3000,
          eval_pairs: int = 300, vocab_limit: int = 512) -> dict:
  """Write images, JSONL, meta files and tokenizer under out_dir (deterministic in every argument).

  Returns {'out_dir', 'train_meta', 'eval_meta', 'tokenizer_dir', 'counts', 'vocab_size' (with added
  tokens), 'model_vocab_size' (vocab_size rounded up to a multiple of 64, for the model config),
  'image_token_id', 'pad_id', 'eos_id', 'special_ids', 'image_px', 'seed'}."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  scans, labels = digits.images, digits.target
  train_idx, eval_idx = split_scans(labels, seed=seed, eval_fraction=eval_fraction)
  rng = np.random.default_rng(seed)
  out_dir = os.path.abspath(out_dir)
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  # Clear our own images only, so a rebuild with fewer pairs leaves no stale files behind.
  for name in os.listdir(image_dir):
    if re.fullmatch(r"(scan_\d{4}|sum_(train|eval)_\d{5})\.png", name):
      os.remove(os.path.join(image_dir, name))

  datasets = {}
  for split, idx, n_pairs in (("train", train_idx, train_pairs), ("eval", eval_idx, eval_pairs)):
    single = []
    for s in idx:
      image = f"images/scan_{s:04d}.png"
      _render(_ink(scans[s]), image_px).save(os.path.join(out_dir, image))
      single.append(_record(f"single-{s:04d}", image, SINGLE_QUESTION, str(labels[s]), "single", [s], [labels[s]]))
    pairs = []
    for k, (a, b) in enumerate(_pairs(idx, n_pairs, rng)):
      image = f"images/sum_{split}_{k:05d}.png"
      _render(_pair_canvas(scans[a], scans[b]), image_px).save(os.path.join(out_dir, image))
      pairs.append(_record(f"sum-{split}-{k:05d}", image, SUM_QUESTION, sum_answer(labels[a], labels[b]), "sum",
                           [a, b], [labels[a], labels[b]]))
    for kind, records in (("single", single), ("sum", pairs)):
      path = os.path.join(out_dir, f"{split}_{kind}.jsonl")
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      datasets[split, kind] = (path, records)

  metas = {}
  for split in ("train", "eval"):
    meta = {f"digits_{split}_{kind}": {"root": out_dir, "annotation": datasets[split, kind][0], "repeat_time": 1,
                                       "data_augment": False, "length": len(datasets[split, kind][1])}
            for kind in ("single", "sum")}
    metas[split] = os.path.join(out_dir, f"{split}_meta.json")
    with open(metas[split], "w") as f:
      json.dump(meta, f, indent=2)

  tok = train_tokenizer([_rendered(r) for kind in ("single", "sum") for r in datasets["train", kind][1]],
                        vocab_limit=vocab_limit)
  _save_tokenizer(tok, out_dir)
  vocab = tok.get_vocab_size(with_added_tokens=True)
  special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
  info = {"out_dir": out_dir, "train_meta": metas["train"], "eval_meta": metas["eval"], "tokenizer_dir": out_dir,
          "counts": {"train_scans": len(train_idx), "eval_scans": len(eval_idx),
                     **{f"{split}_{kind}": len(v[1]) for (split, kind), v in datasets.items()}},
          "vocab_size": vocab, "model_vocab_size": -(-vocab // 64) * 64, "image_token_id": special[IMG_CONTEXT],
          "pad_id": special["<|endoftext|>"], "eos_id": special["<|im_end|>"], "special_ids": special,
          "image_px": image_px, "seed": seed}
  with open(os.path.join(out_dir, "build.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def read_meta(meta_path: str) -> list[dict]:
  """Every record of a meta file's datasets (each repeated repeat_time times, rounded down, at least once),
  with `dataset` set and `image` joined to the dataset's root, in file order. Relative paths are taken from
  the working directory, as in InternVL (build writes absolute ones)."""
  with open(meta_path) as f:
    meta = json.load(f)
  out = []
  for name, d in meta.items():
    with open(d["annotation"]) as f:
      records = [json.loads(line) for line in f if line.strip()]
    for r in records * max(1, int(d.get("repeat_time", 1))):
      out.append({**r, "dataset": name, "image": os.path.join(d["root"], r["image"])})
  return out


# ------------------------------------------------------------------------------------------- answers

# Answer checking is the general one (also used by train.py's evaluation and the RL rewards).
extract_answer, score, accuracy_table = evaluation.extract_answer, evaluation.final_answer, evaluation.accuracy_table


# ------------------------------------------------------------------------------------------- CLI

def sequence_lengths(info: dict, *, tokens_per_tile: int = 16) -> dict:
  """Tokens of the first training sample of each kind through the Processor (one tile of image_px)."""
  processor = Processor(Tokenizer.from_pretrained(info["tokenizer_dir"]), tokens_per_tile=tokens_per_tile,
                        tile_size=info["image_px"], max_tiles=1, use_thumbnail=False)
  out = {}
  for r in read_meta(info["train_meta"]):
    if r["kind"] not in out:
      out[r["kind"]] = len(processor(r["conversations"], images=[r["image"]], train=True)["input_ids"])
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-fraction", type=float, default=0.2)
  parser.add_argument("--image-px", type=int, default=56)
  parser.add_argument("--train-pairs", type=int, default=3000)
  parser.add_argument("--eval-pairs", type=int, default=300)
  parser.add_argument("--tokens-per-tile", type=int, default=16, help="only for the printed sequence lengths")
  args = parser.parse_args(argv)
  info = build(args.out, seed=args.seed, eval_fraction=args.eval_fraction, image_px=args.image_px,
               train_pairs=args.train_pairs, eval_pairs=args.eval_pairs)
  for key, n in info["counts"].items():
    print(f"{key:<14} {n:>6}")
  print(f"vocab_size {info['vocab_size']} (model vocab_size {info['model_vocab_size']}), "
        f"image_token_id {info['image_token_id']}, pad_id {info['pad_id']}, eos_id {info['eos_id']}")
  lengths = sequence_lengths(info, tokens_per_tile=args.tokens_per_tile)
  print("tokens per sample at tokens_per_tile=%d: %s" % (args.tokens_per_tile,
                                                          ", ".join(f"{k} {n}" for k, n in lengths.items())))
  print(f"train meta {info['train_meta']}\neval meta  {info['eval_meta']}")


if __name__ == "__main__":
  main()
