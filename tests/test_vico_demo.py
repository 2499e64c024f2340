"""The ViCO demo's data, evaluation and picture: scan-disjoint canvases cut into one tile per cell, visual-token
counts with and without routing, the routing picture and the comparison table."""
import dataclasses
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from internvl_jax import zoo
from internvl_jax.config import FlashConfig
from internvl_jax.data import load_records
from internvl_jax.demos import digits, vico
from internvl_jax.inputs import dynamic_resolution as dr
from internvl_jax.inputs.processor import Processor
from internvl_jax.inputs.tokenizer import Tokenizer

SMALL = dict(train=40, eval=12)


@pytest.fixture(scope="module")
def built(digits_dir, tmp_path_factory):
  return vico.build_canvases(str(tmp_path_factory.mktemp("canvas")), digits_dir=digits_dir, **SMALL)


@pytest.fixture(scope="module")
def processor(built):
  return Processor(Tokenizer.from_pretrained(built["tokenizer_dir"]), tokens_per_tile=16, tile_size=56, max_tiles=4,
                   use_thumbnail=False)


@pytest.fixture(scope="module")
def model(processor):
  """A random Flash model in the digits geometry (56 px tiles of 7 px patches: 16 tokens, 4 compressed) whose
  router compresses every tile (p0 >= 0 always holds). Weights are drawn with numpy into the abstract model:
  `init_model`'s jitted initialiser alone takes 12-19 s to compile on two cores."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from internvl_jax.model.internvl import InternVL
  base, tok = zoo.get("tiny-flash"), processor.tokenizer
  size = tok.tok.get_vocab_size(with_added_tokens=True)
  cfg = base.replace(vision=dataclasses.replace(base.vision, image_size=56, patch_size=7),
                     text=dataclasses.replace(base.text, vocab_size=-(-size // 128) * 128),
                     image_token_id=tok.image_token_id, flash=FlashConfig(rule="absolute", absolute_threshold=0.0))
  assert (cfg.tokens_per_tile, cfg.compressed_tokens_per_tile) == (16, 4)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "norm" in name and "weight" in name:
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, 0.5 / max(1, x.shape[0]) ** 0.5, x.shape).astype(x.dtype))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def test_deterministic(built, digits_dir, tmp_path):
  again = vico.build_canvases(str(tmp_path), digits_dir=digits_dir, **SMALL)
  assert {k: v for k, v in again.items() if k not in ("out_dir", "tokenizer_dir", "train_meta", "eval_meta")} == \
      {k: v for k, v in built.items() if k not in ("out_dir", "tokenizer_dir", "train_meta", "eval_meta")}
  for name in ("canvas_train.jsonl", "canvas_eval.jsonl", "tokenizer.json", "tokenizer_config.json",
               "images/canvas_train_00000.png", "images/canvas_train_00039.png", "images/canvas_eval_00011.png"):
    assert filecmp.cmp(os.path.join(built["out_dir"], name), tmp_path / name, shallow=False), name
  # A split's canvases depend on its own count only.
  other = vico.build_canvases(str(tmp_path / "other"), digits_dir=digits_dir, train=5, eval=12)
  assert filecmp.cmp(os.path.join(built["out_dir"], "canvas_eval.jsonl"), tmp_path / "other" / "canvas_eval.jsonl",
                     shallow=False)
  assert other["counts"]["train"] == 5


def test_split_and_meta(built):
  train, held = digits.read_meta(built["train_meta"]), digits.read_meta(built["eval_meta"])
  assert (len(train), len(held)) == (40, 12)
  assert {r["dataset"] for r in train} == {"canvas_train"} and {r["dataset"] for r in held} == {"canvas_eval"}
  train_scans = {s for r in train for s in r["scans"]}
  eval_scans = {s for r in held for s in r["scans"]}
  assert not train_scans & eval_scans
  # the same held-out scans as the digits demo's default split
  target = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target
  _, eval_idx = digits.split_scans(target, seed=0, eval_fraction=0.2)
  assert eval_scans <= set(eval_idx.tolist())
  for name in ("canvas_train", "canvas_eval"):
    with open(built[f"{name.split('_')[1]}_meta"]) as f:
      meta = json.load(f)
    assert list(meta) == [name] and os.path.isabs(meta[name]["root"]) and os.path.isabs(meta[name]["annotation"])
    assert meta[name]["length"] == SMALL[name.split("_")[1]]
  kinds = [c for r in train + held for c in r["cells"]]
  assert set(kinds) == {"digit", "blank", "faint"}
  cells = built["cells"]["eval"]
  assert built["non_digit_fraction"]["eval"] == pytest.approx(1 - cells["digit"] / (4 * 12))
  # Training text encodes without <unk> under the digits tokenizer.
  tok = Tokenizer.from_pretrained(built["tokenizer_dir"])
  assert tok.tok.token_to_id("<unk>") not in tok.encode(vico.QUESTION + vico.answer(range(10)))


def test_one_tile_per_cell(built, processor):
  target = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits()
  for r in digits.read_meta(built["eval_meta"]):
    assert r["kind"] == "canvas" and len(r["cells"]) == 4 and r["cells"].count("digit") == len(r["scans"]) in (1, 2)
    assert r["digits"] == [int(target.target[s]) for s in r["scans"]]
    assert r["conversations"][1]["value"] == "Answer: " + "".join(map(str, r["digits"]))
    assert Image.open(r["image"]).size == (112, 112)
    out = processor(r["conversations"], images=[r["image"]], train=True)
    assert out["num_tiles"].tolist() == [4] and out["pixel_values"].shape == (4, 56, 56, 3)
    assert int(np.sum(out["input_ids"] == processor.tokenizer.image_token_id)) == 4 * 16
    tiles = np.round((out["pixel_values"] * dr.IMAGENET_STD + dr.IMAGENET_MEAN) * 255)
    scans = iter(r["scans"])
    for tile, kind in zip(tiles, r["cells"]):  # row-major cells = the processor's tile order
      if kind == "digit":
        want = np.asarray(digits._render(digits._ink(target.images[next(scans)]), 56), np.float32)
        np.testing.assert_allclose(tile, want, atol=1)
      elif kind == "blank":
        assert tile.min() >= 254
      else:  # faint: light but not white
        assert tile.min() >= 229 and tile.min() < 254


def test_evaluate_full_path(built, processor, model):
  records = load_records(built["eval_meta"], limit=3)
  out = vico.evaluate(model, processor, records, flash=False, max_new_tokens=2)
  assert out["visual_tokens_per_image"] == out["visual_tokens_before"] == 64
  assert out["compressed_fraction"] == 0.0 and 0.0 <= out["accuracy"] <= 1.0
  assert [r["id"] for r in out["rows"]] == ["canvas_eval_00000", "canvas_eval_00001", "canvas_eval_00002"]
  assert all(r["compressed"] == [False] * 4 for r in out["rows"])
  assert all(r["reference"].startswith("Answer: ") for r in out["rows"])


def test_evaluate_flash_and_picture(built, processor, model, tmp_path):
  records = load_records(built["eval_meta"], limit=4)
  out = vico.evaluate(model, processor, records, flash=True, batch=2, max_new_tokens=2)  # two equal calls
  assert out["visual_tokens_per_image"] == 16 and out["visual_tokens_before"] == 64
  assert out["compressed_fraction"] == 1.0 and len(out["rows"]) == 4
  assert all(r["compressed"] == [True] * 4 for r in out["rows"])
  path = vico.draw_routing(records, out["rows"], str(tmp_path / "routing.png"), columns=2)
  side = 112 * vico.SCALE
  want = (vico.PAD + 2 * (side + vico.PAD), vico.PAD + 2 * (side + vico.CAPTION + vico.PAD) + vico.LEGEND)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape[:2] == want[::-1]
  # every tile of the first canvas is outlined in the compressed colour
  x0 = y0 = vico.PAD
  for r, c in np.ndindex(2, 2):
    assert tuple(image[y0 + r * side // 2, x0 + c * side // 2 + side // 4]) == vico.COMPRESSED
  # plain bool lists work too; at most 12 canvases are drawn
  many = vico.draw_routing(digits.read_meta(built["eval_meta"]) * 2, [[False, True, False, False]] * 24,
                           str(tmp_path / "many.png"))
  assert Image.open(many).size == (vico.PAD + 4 * (side + vico.PAD),
                                   vico.PAD + 3 * (side + vico.CAPTION + vico.PAD) + vico.LEGEND)


def test_evaluate_mixed_routing(built, processor, model):
  """A threshold at the median p0 compresses some tiles: the per-tile decisions agree with generate's counts."""
  import jax
  from flax import nnx
  from internvl_jax.model.internvl import InternVL
  records = load_records(built["eval_meta"], limit=2)
  pixels = np.concatenate([processor(q["messages"], images=q["images"])["pixel_values"] for q in records])
  p0 = np.asarray(jax.jit(lambda s, x: nnx.merge(nnx.graphdef(model), s).flash_features(x)[2])(nnx.state(model),
                                                                                                 pixels))
  threshold = float(np.median(p0))
  cfg = model.cfg.replace(flash=FlashConfig(rule="absolute", absolute_threshold=threshold))
  mixed = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))), nnx.state(model))
  out = vico.evaluate(mixed, processor, records, flash=True, max_new_tokens=1)
  masks = [r["compressed"] for r in out["rows"]]
  assert np.concatenate(masks).tolist() == (p0 >= np.float32(threshold)).tolist()
  assert 0 < out["compressed_fraction"] < 1
  assert out["visual_tokens_per_image"] == pytest.approx(64 - 12 * np.mean([sum(m) for m in masks]))


def test_table():
  text = vico.table([("(a) 16 tokens per tile", 0.9, 64.0, 75.0), ("(b) router", 0.88, 30.0, None)])
  lines = text.splitlines()
  assert len(lines) == 4 and len({len(line) for line in lines}) == 1
  assert "100.0%" in lines[2] and "46.9%" in lines[3] and "97.8%" in lines[3]
  assert "1m15s" in lines[2] and lines[3].rstrip().endswith("-")
