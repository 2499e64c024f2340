"""The digits demo data: scan-disjoint split, determinism, images, tokenizer, processor labels, answers."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from internvl_jax.demos import digits
from internvl_jax.inputs.conversation import INTERNVL_SYSTEM
from internvl_jax.inputs.labels import IGNORE
from internvl_jax.inputs.processor import Processor
from internvl_jax.inputs.tokenizer import Tokenizer

SMALL = dict(train_pairs=300, eval_pairs=60)  # the full 3000 pairs only cost time here


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return digits.build(str(tmp_path_factory.mktemp("digits")), seed=0, **SMALL)


@pytest.fixture(scope="module")
def target():
  from sklearn.datasets import load_digits
  return load_digits().target


def records(info, split):
  return digits.read_meta(info[f"{split}_meta"])


def test_split_is_disjoint_by_scan(built):
  train, held = records(built, "train"), records(built, "eval")
  train_scans = {s for r in train for s in r["scans"]}
  eval_scans = {s for r in held for s in r["scans"]}
  assert not train_scans & eval_scans
  assert train_scans | eval_scans == set(range(1797))
  c = built["counts"]
  assert (c["train_scans"], c["eval_scans"]) == (1437, 360)
  assert (c["train_single"], c["eval_single"], c["train_sum"], c["eval_sum"]) == (1437, 360, 300, 60)
  assert {r["dataset"] for r in train} == {"digits_train_single", "digits_train_sum"}
  assert {r["dataset"] for r in held} == {"digits_eval_single", "digits_eval_sum"}
  # Every scan is asked about once, and pairs never repeat.
  assert sorted(r["scans"][0] for r in train if r["kind"] == "single") == sorted(train_scans)
  pairs = [tuple(r["scans"]) for r in train if r["kind"] == "sum"]
  assert len(set(pairs)) == len(pairs) and all(a != b for a, b in pairs)


def test_deterministic_by_seed(built, tmp_path):
  again = digits.build(str(tmp_path), seed=0, **SMALL)
  assert again["counts"] == built["counts"] and again["special_ids"] == built["special_ids"]
  for name in ("train_single.jsonl", "train_sum.jsonl", "eval_single.jsonl", "eval_sum.jsonl", "tokenizer.json",
               "tokenizer_config.json"):
    assert filecmp.cmp(os.path.join(built["out_dir"], name), tmp_path / name, shallow=False), name
  for name in ("scan_0000.png", "sum_train_00007.png", "sum_eval_00003.png"):
    assert filecmp.cmp(os.path.join(built["out_dir"], "images", name), tmp_path / "images" / name, shallow=False)
  target = np.arange(100) % 10
  a, b = digits.split_scans(target, seed=0, eval_fraction=0.2), digits.split_scans(target, seed=1, eval_fraction=0.2)
  assert not np.array_equal(a[1], b[1])
  assert np.bincount(target[a[1]]).tolist() == [2] * 10  # stratified


def test_images_exist_and_show_the_scans(built):
  from sklearn.datasets import load_digits
  scans = load_digits().images
  for r in records(built, "train") + records(built, "eval"):
    with Image.open(r["image"]) as im:
      assert (im.mode, im.size) == ("RGB", (56, 56)), r["image"]
  single = next(r for r in records(built, "eval") if r["kind"] == "single")
  pixels = np.asarray(Image.open(single["image"]))[..., 0]
  # 7x nearest-neighbour upscale of the scan, dark ink on white.
  ink = 255 - np.round(scans[single["scans"][0]] * 255 / 16)
  np.testing.assert_array_equal(pixels, np.kron(ink, np.ones((7, 7))))
  pair = next(r for r in records(built, "eval") if r["kind"] == "sum")
  pixels = np.asarray(Image.open(pair["image"]), np.float32)[..., 0]
  assert pixels[:10].min() == 255 and pixels[-10:].min() == 255  # padding above and below the pair
  assert pixels[:, :28].min() < 128 and pixels[:, 28:].min() < 128  # ink on both halves


def test_answers_match_scan_labels(built, target):
  for r in records(built, "train") + records(built, "eval"):
    labels = [int(target[s]) for s in r["scans"]]
    assert r["digits"] == labels
    human, gpt = r["conversations"]
    if r["kind"] == "single":
      assert human["value"] == digits.SINGLE_QUESTION and gpt["value"] == str(labels[0])
    else:
      a, b = labels
      assert human["value"] == digits.SUM_QUESTION and gpt["value"] == f"{a} + {b} = {a + b}. Answer: {a + b}"
      assert digits.extract_answer(gpt["value"]) == str(a + b)


def test_tokenizer(built):
  tok = Tokenizer.from_pretrained(built["tokenizer_dir"])
  for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
    assert tok.token_id(t) == built["special_ids"][t]
    assert tok.encode(t) == [tok.token_id(t)]
  assert tok.image_token_id == built["image_token_id"]
  assert tok.pad_id == built["pad_id"] == tok.token_id("<|endoftext|>")
  assert tok.eos_id == built["eos_id"]
  size = tok.tok.get_vocab_size(with_added_tokens=True)
  assert size == built["vocab_size"] <= built["model_vocab_size"] and built["model_vocab_size"] % 64 == 0
  assert 200 <= size <= 512
  ids = [tok.encode(str(d)) for d in range(10)]
  assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 10
  assert tok.encode("1207") == [ids[1][0], ids[2][0], ids[0][0], ids[7][0]]
  assert tok.encode(INTERNVL_SYSTEM) == [tok.token_id(INTERNVL_SYSTEM)]  # the system message is one token
  text = "<think>\n9 + 9 = 18\n</think>\n\nAnswer: 18"
  assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
  config = json.load(open(os.path.join(built["tokenizer_dir"], "tokenizer_config.json")))
  assert config["pad_token"] == "<|endoftext|>"


def test_processor_round_trip(built):
  tok = Tokenizer.from_pretrained(built["tokenizer_dir"])
  processor = Processor(tok, tokens_per_tile=16, tile_size=56, max_tiles=1, use_thumbnail=False)
  train = records(built, "train")
  for r in train[:3] + [r for r in train if sum(r["digits"]) >= 10][:2] + records(built, "eval")[-3:]:
    out = processor(r["conversations"], images=[r["image"]], train=True)
    ids, labels = out["input_ids"], out["labels"]
    assert out["pixel_values"].shape == (1, 56, 56, 3) and (ids == tok.image_token_id).sum() == 16
    answer = r["conversations"][1]["value"]
    supervised = ids[labels != IGNORE]
    assert tok.decode(supervised, skip_special_tokens=False) == answer + "<|im_end|>"
    assert supervised[-1] == tok.eos_id and np.array_equal(labels[labels != IGNORE], supervised)
    # The supervised span is one contiguous run at the end, before the trailing newline.
    where = np.flatnonzero(labels != IGNORE)
    assert np.array_equal(where, np.arange(where[0], len(ids) - 1))
    # system turn 5 tokens, user turn 24 (16 image), assistant turn 4 + the answer's tokens: "7" is 1,
    # "3 + 5 = 8. Answer: 8" 7 and a two-digit sum 9.
    answer_tokens = 1 if r["kind"] == "single" else 7 + 2 * (sum(r["digits"]) >= 10)
    assert len(ids) == 33 + answer_tokens, answer
  prompt = processor(records(built, "eval")[0]["conversations"][:1], images=[records(built, "eval")[0]["image"]])
  assert len(prompt["input_ids"]) == 31


@pytest.mark.parametrize("text, want", [
    ("7", "7"), ("3 + 5 = 8. Answer: 8", "8"), ("Answer: 12.", "12"), ("answer:  07", "7"),
    ("The answer is 4", "4"), ("Answer: 3 Answer: 5", "5"), ("2 + 2 = 4. Answer: 5 + 0", "5"),
    ("<think>\n1 + 2 = 3\n</think>\n\nAnswer: 3", "3"), ("I think it's 6, no, 9", "9"), ("8.0", "8"),
    ("it is 2.5", "2.5"), ("difference -3", "-3"), ("3-5", "5"), ("Answer: none, maybe 4", "4"),
    ("no digits here", None), ("", None), ("Answer:", None)])
def test_extract_answer(text, want):
  assert digits.extract_answer(text) == want


def test_score_and_table():
  assert digits.score("8", "3 + 5 = 8. Answer: 8") and digits.score("3 + 5 = 8. Answer: 08", "8")
  assert not digits.score("3 + 5 = 8. Answer: 9", "3 + 5 = 8. Answer: 8") and not digits.score("", "8")
  assert not digits.score("18", "8") and not digits.score("8", "18")
  with pytest.raises(ValueError, match="no checkable answer"):
    digits.score("8", "eight")
  table = digits.accuracy_table([("single", True), ("single", False), ("sum", True), ("single", True)])
  lines = table.splitlines()
  assert lines[0].split() == ["kind", "n", "accuracy"]
  assert lines[1].split() == ["single", "3", "66.7%"] and lines[2].split() == ["sum", "1", "100.0%"]
  assert lines[3].split() == ["all", "4", "75.0%"]
  assert [line.split() for line in digits.accuracy_table([]).splitlines()] == [lines[0].split()]


def test_cli(tmp_path, capsys):
  digits.main(["--out", str(tmp_path), "--train-pairs", "20", "--eval-pairs", "5"])
  out = capsys.readouterr().out
  assert "train_sum          20" in out and "eval_scans        360" in out and "single 34" in out
  info = json.load(open(tmp_path / "build.json"))
  assert info["counts"]["eval_sum"] == 5 and os.path.exists(info["train_meta"])
