"""Training data pipeline: meta datasets through the processor, packing, host sharding, seeds, iterator
state, bad samples, video and pure-text samples, and a TFDS (ArrayRecord) source built here."""
import io
import json

import numpy as np
import pytest
from PIL import Image

import internvl_jax as ij
from internvl_jax import data
from internvl_jax.data import samples as samples_lib
from internvl_jax.data.packing import Packer
from internvl_jax.inputs.labels import IGNORE

L, R = 512, 8  # row budget in tokens and tiles


@pytest.fixture(scope="module")
def processor(ckpt_dir):
  # 28 px tiles of 4 tokens keep samples small; at most 4 tiles per image.
  return ij.Processor.from_pretrained(str(ckpt_dir), tile_size=28, tokens_per_tile=4, max_tiles=4)


def write_video(path, n=12, size=32):
  from test_inputs import write_video as write  # tests/ is on sys.path (pytest's rootdir-relative import)
  write(path, n=n, size=size)


def turn(question, answer):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# Each good line: (record, the conversation the processor should see, its images). Line 1 has no
# placeholder: the pipeline adds it, as the official loader does.
GOOD = [
    ({"image": "wide.png", "conversations": turn("<image>\nWhat is this? 0", "A red panda 0.")},
     turn("<image>\nWhat is this? 0", "A red panda 0."), ["wide.png"]),
    ({"image": "sq.png", "conversations": turn("What is this? 1", "Bamboo 1.")},
     turn("<image>\nWhat is this? 1", "Bamboo 1."), ["sq.png"]),
    ({"image": ["wide.png", "sq.png"], "conversations": turn("Image-1: <image>\nImage-2: <image>\nCompare 2.", "Ok.")},
     turn("Image-1: <image>\nImage-2: <image>\nCompare 2.", "Ok."), ["wide.png", "sq.png"]),
    ({"image": "tall.png", "conversations": turn("<image>\nDescribe 3.", "Tall 3.")},
     turn("<image>\nDescribe 3.", "Tall 3."), ["tall.png"]),
    ({"conversations": [{"from": "system", "value": "Be brief."}] + turn("Hi 4", "Hello 4.")},
     [{"from": "system", "value": "Be brief."}] + turn("Hi 4", "Hello 4."), []),
] + [({"image": "", "conversations": turn(f"What is {k} + {k}?", f"The answer is {2 * k}.")},
      turn(f"What is {k} + {k}?", f"The answer is {2 * k}."), []) for k in range(5, 12)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, processor):
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for name, (w, h) in {"wide.png": (56, 28), "sq.png": (28, 28), "tall.png": (28, 84)}.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
  (root / "corrupt.png").write_bytes(b"not a png at all")
  (root / "corrupt.mp4").write_bytes(b"not a video")
  write_video(root / "clip.mp4")

  def jsonl(name, lines):
    path = root / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)

  bad = [
      {"image": "nope.png", "conversations": turn("<image>\nx", "y")},  # line 1: missing_file
      {"image": "corrupt.png", "conversations": turn("<image>\nx", "y")},  # 2: corrupt_media
      "{oops",  # 3: bad_record (not JSON)
      {"image": "sq.png"},  # 4: bad_record (no conversations)
      {"conversations": turn("word " * 600, "y")},  # 5: too_long
      {"image": ["sq.png"] * 9, "conversations": turn("<image>" * 9, "y")},  # 6: too_many_tiles (9 > 8)
      {"conversations": [{"from": "human", "value": "only a question"}]},  # 7: no_targets
      {"video": "gone.mp4", "conversations": turn("<video>\nx", "y")},  # 8: missing_file
      {"video": "corrupt.mp4", "conversations": turn("<video>\nx", "y")},  # 9: corrupt_media
      GOOD[0][0], GOOD[4][0],  # 10, 11: fine
  ]
  videos = [{"video": "clip.mp4", "conversations": turn("<video>\nWhat happens?", "It brightens.")},
            {"video": "clip.mp4", "conversations": turn("Describe.", "Frames.")}]
  expected = {}
  for record, conv, images in GOOD:
    out = processor(conv, images=[str(root / p) for p in images], train=True)
    expected[tuple(out["input_ids"].tolist())] = out
  return {"root": str(root), "good": jsonl("good.jsonl", [r for r, _, _ in GOOD]), "bad": jsonl("bad.jsonl", bad),
          "allbad": jsonl("allbad.jsonl", bad[:2]),
          "video": jsonl("video.jsonl", videos), "expected": expected}


def cfg(files, datasets, **kw):
  meta = {name: {"root": files["root"], "annotation": files[name], **extra} for name, extra in datasets.items()}
  return {"meta": meta, "max_tokens": L, "max_tiles_per_row": R, "num_threads": 2, "prefetch": 4, **kw}


def segments(batch, b):
  """Row b -> [(input_ids, labels, loss_weights, position_ids)] per segment, checking the row's layout."""
  seg = batch["segment_ids"][b]
  used = int(np.sum(seg > 0))
  assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0), "samples first, then padding"
  assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
  assert np.all(batch["labels"][b, used:] == IGNORE) and np.all(batch["loss_weights"][b, used:] == 0)
  assert np.all(batch["position_ids"][b, used:] == 0)
  out = []
  for s in range(1, int(seg.max(initial=0)) + 1):
    idx = np.flatnonzero(seg == s)
    out.append(tuple(batch[k][b, idx] for k in ("input_ids", "labels", "loss_weights", "position_ids")))
  return out


def ids_of(batch):
  return [tuple(ids.tolist()) for b in range(len(batch["input_ids"])) for ids, *_ in segments(batch, b)]


def drain(it):
  return [tuple(ids) for batch in it for ids in ids_of(batch)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------- packing

def fake(key, tokens, tiles=0):
  return samples_lib.Sample(key, np.full(tokens, 7, np.int32), np.full(tokens, 7, np.int32),
                            np.ones(tokens, np.float32), np.zeros((tiles, 2, 2, 3), np.uint8) if tiles else None)


def test_packer_first_fit_and_fullest_row_out():
  p = Packer(10, 2, buffer_size=2)
  for s in [fake(0, 6), fake(1, 6), fake(2, 3, 1), fake(3, 5)]:  # 3 fits no row: the fullest (0+2, 9) leaves
    p.add(s)
  assert p.state() == {"open": [[1], [3]], "ready": [[0, 2]]}
  p.add(fake(4, 4))  # joins row [1] and fills it to 10 tokens: out at once
  p.add(fake(5, 1, 2))  # tiles 2 <= 2
  p.add(fake(6, 1, 1))  # would make 3 tiles: a new row
  p.flush()
  assert [[s.key for s in r] for r in p.take(10)] == [[0, 2], [1, 4], [3, 5], [6]]
  q = Packer(10, 2, pack=False)
  q.add(fake(0, 3))
  q.add(fake(1, 3))
  assert q.state() == {"open": [], "ready": [[0], [1]]}
  with pytest.raises(ValueError, match="cannot fit"):
    q.add(fake(2, 11))


def test_batches_hold_the_processor_outputs(files, processor):
  it = data.make_iterator(cfg(files, {"good": {}}, buffer_size=3), processor, batch_size=2, seed=0,
                          process_index=0, process_count=1)
  assert samples_lib.EXACT  # tiles wait in the buffer as uint8
  expected, seen, multi = files["expected"], set(), 0
  for _ in range(6):
    batch = next(it)
    assert set(batch) == {"input_ids", "labels", "loss_weights", "segment_ids", "position_ids", "pixel_values",
                          "num_tiles"}
    assert batch["pixel_values"].shape == (2, R, 28, 28, 3) and batch["pixel_values"].dtype == np.float32
    for b in range(2):
      tiles = []
      segs = segments(batch, b)
      multi += len(segs) > 1
      for ids, labels, weights, positions in segs:
        want = expected[tuple(ids.tolist())]
        np.testing.assert_array_equal(labels, want["labels"])
        np.testing.assert_array_equal(weights, want["loss_weights"])
        np.testing.assert_array_equal(positions, np.arange(len(ids)))
        if want["pixel_values"] is not None:
          tiles.append(want["pixel_values"])
        seen.add(tuple(ids.tolist()))
      n = sum(len(t) for t in tiles)
      assert batch["num_tiles"][b] == n <= R
      if tiles:  # tiles in token order, bit-identical after the uint8 round trip; then zero tiles
        np.testing.assert_array_equal(batch["pixel_values"][b, :n], np.concatenate(tiles))
      assert not batch["pixel_values"][b, n:].any()
      image_tokens = np.sum(batch["input_ids"][b] == processor.tokenizer.image_token_id)
      assert image_tokens == n * processor.tokens_per_tile
  assert seen == set(expected) and multi > 0
  assert it.stats()["skipped"] == 0 and 0 < it.stats()["token_fill"] <= 1


def test_unpacked_rows_and_text_only_rows(files, processor):
  text = {"good": {}}
  it = data.make_iterator(cfg(files, text, pack=False, max_tiles_per_row=0, num_epochs=1), processor,
                          batch_size=3, seed=0, process_index=0, process_count=1)
  batches = list(it)
  assert all("pixel_values" not in b for b in batches)
  assert all(set(np.unique(b["segment_ids"])) <= {0, 1} for b in batches)
  assert len(drain(batches)) == 8  # the 8 text samples; the 4 with images have too many tiles for R = 0
  assert it.stats()["reasons"] == {"too_many_tiles": 4}
  assert not batches[-1]["segment_ids"][-1].any()  # 8 rows in batches of 3: the last row is padding


# ------------------------------------------------------------------------------------------- order

def test_repeat_time(files, processor):
  conf = cfg(files, {"good": {"repeat_time": 2}, "video": {"repeat_time": 0.5}}, pack=False, num_epochs=1)
  conf["meta"]["video"]["annotation"] = files["good"]  # the same 12 lines as a second dataset
  it = data.make_iterator(conf, processor, batch_size=4, seed=3, process_index=0, process_count=1)
  assert it.epoch_size == 2 * 12 + 6
  counts = {}
  for ids in drain(it):
    counts[ids] = counts.get(ids, 0) + 1
  assert sorted(counts.values()).count(3) == 6 and sorted(counts.values()).count(2) == 6
  assert data.meta.repeat_indices(10, 2.5, np.random.default_rng(0)).shape == (25,)
  sub = data.meta.repeat_indices(10, 0.3, np.random.default_rng(0))
  assert len(sub) == 3 and len(set(sub.tolist())) == 3


def test_host_shards_are_disjoint_and_cover(files, processor):
  shards = [drain(data.make_iterator(cfg(files, {"good": {}}, pack=False, num_epochs=1), processor, batch_size=2,
                                     seed=5, process_index=i, process_count=3)) for i in range(3)]
  assert [len(s) for s in shards] == [4, 4, 4]
  assert set().union(*map(set, shards)) == set(files["expected"])
  held_out = {"good": {"root": files["root"], "annotation": files["good"], "repeat_time": 3}}
  evals = [drain(data.make_eval_iterator(held_out, cfg(files, {"bad": {}}, pack=False), processor, batch_size=2,
                                         process_index=i, process_count=2)) for i in range(2)]
  in_file_order = [tuple(processor(c, images=[f"{files['root']}/{p}" for p in im], train=True)["input_ids"].tolist())
                   for _, c, im in GOOD]
  assert evals[0] == in_file_order[0::2] and evals[1] == in_file_order[1::2]


def test_seed_determines_order_and_epochs_reshuffle(files, processor):
  def order(seed):
    it = data.make_iterator(cfg(files, {"good": {}}, pack=False), processor, batch_size=4, seed=seed,
                            process_index=0, process_count=1)
    return [i for _ in range(6) for i in ids_of(next(it))]

  a, b = order(0), order(1)
  assert a == order(0) and a != b
  assert set(a[:12]) == set(a[12:]) == set(files["expected"]) and a[:12] != a[12:]


def test_state_restore_reproduces_the_next_batches(files, processor):
  conf = cfg(files, {"good": {"data_augment": True}, "video": {}}, buffer_size=3, min_num_frame=1, max_num_frame=3)

  def fresh():
    return data.make_iterator(conf, processor, batch_size=2, seed=7, process_index=1, process_count=2)

  ref = fresh()
  first = [next(ref) for _ in range(2)]
  state = json.loads(json.dumps(ref.get_state()))
  assert state["packer"]["open"], "the packing buffer is part of the state"
  rest = [next(ref) for _ in range(3)]
  it = fresh()
  it.set_state(state)
  assert_batches_equal([next(it) for _ in range(3)], rest)
  assert it.stats() == ref.stats()
  again = fresh()
  next(again)  # restoring mid-run replaces what the iterator had buffered
  again.set_state(state)
  assert_batches_equal([next(again) for _ in range(3)], rest)
  assert_batches_equal([next(fresh()) for _ in range(1)], first[:1])
  paused = fresh()
  for _ in range(2):
    next(paused)
  paused.close()  # drops the prefetched samples; the stream reopens where it was
  assert_batches_equal([next(paused) for _ in range(3)], rest)
  with pytest.raises(ValueError, match="another data setup"):
    data.make_iterator(conf, processor, batch_size=2, seed=8, process_index=1, process_count=2).set_state(state)


# ------------------------------------------------------------------------------------------- bad data

def test_bad_samples_are_skipped_counted_and_reported(files, processor):
  it = data.make_iterator(cfg(files, {"bad": {}}, num_epochs=1, pack=False), processor, batch_size=1, seed=0,
                          process_index=0, process_count=1)
  got = drain(it)
  assert sorted(got) == sorted([k for k in files["expected"] if k in got]) and len(got) == 2
  stats = it.stats()
  assert stats["reasons"] == {"missing_file": 2, "corrupt_media": 2, "bad_record": 2, "too_long": 1,
                              "too_many_tiles": 1, "no_targets": 1}
  assert stats["samples"] == 2 and stats["skipped"] == 9 and len(stats["examples"]) == 9
  errors = " | ".join(stats["examples"])
  for where in ("bad line 1: missing_file", "bad line 2: corrupt_media", "bad line 3: bad_record",
                "bad line 5: too_long", "bad line 6: too_many_tiles", "bad line 9: corrupt_media"):
    assert where in errors
  stuck = data.make_iterator(cfg(files, {"allbad": {}}, max_consecutive_skips=3), processor,
                             batch_size=1, seed=0, process_index=0, process_count=1)
  with pytest.raises(RuntimeError, match="3 samples in a row were skipped"):
    for _ in range(5):
      next(stuck)


def test_video_and_pure_text_samples(files, processor):
  it = data.make_iterator(cfg(files, {"video": {}}, min_num_frame=2, max_num_frame=4, pack=False, num_epochs=1),
                          processor, batch_size=2, seed=0, process_index=0, process_count=1)
  batch = next(it)
  for b in range(2):
    text = processor.tokenizer.decode(batch["input_ids"][b][batch["segment_ids"][b] > 0], skip_special_tokens=False)
    n = int(batch["num_tiles"][b])
    assert 2 <= n <= 4 and f"Frame-{n}: <img>" in text and "<video>" not in text
    assert np.sum(batch["input_ids"][b] == processor.tokenizer.image_token_id) == 4 * n
  pure = [k for k, out in files["expected"].items() if out["pixel_values"] is None]
  assert len(pure) == 8  # lines 4-11, no image tiles


# ------------------------------------------------------------------------------------------- TFDS

def png(rng, w, h):
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def test_tfds_source(tmp_path, processor):
  import tensorflow_datasets as tfds  # a pinned test dependency: failing to import is a failure
  rng = np.random.default_rng(1)
  examples = [(png(rng, 56, 28), turn("<image>\nWhat is this?", f"Thing {i}.")) for i in range(3)]
  examples += [(b"", turn("Hi", "Hello.")), (b"garbage", turn("<image>\nx", "y"))]

  class TinyVlData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(), dtype=np.object_), "conversations": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, conv) in enumerate(examples):
        yield i, {"image": image, "conversations": json.dumps(conv)}

  builder = TinyVlData(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  want = {}
  for image, conv in examples[:4]:
    out = processor(conv, images=[image] if image else [], train=True)
    want[tuple(out["input_ids"].tolist())] = out
  meta = {"by_dir": {"tfds": str(builder.data_dir)}, "by_name": {"tfds": "tiny_vl_data", "data_dir": str(tmp_path)}}
  for name in meta:
    it = data.make_iterator({"meta": {name: meta[name]}, "max_tokens": L, "max_tiles_per_row": R, "num_threads": 0,
                             "pack": False, "num_epochs": 1}, processor, batch_size=5, seed=0, process_index=0,
                            process_count=1)
    batch = next(it)
    assert sorted(ids_of(batch)) == sorted(want)
    for b in range(4):
      ids = tuple(batch["input_ids"][b][batch["segment_ids"][b] == 1].tolist())
      n = int(batch["num_tiles"][b])
      np.testing.assert_array_equal(batch["pixel_values"][b, :n], want[ids]["pixel_values"][:n] if n else
                                    np.zeros((0, 28, 28, 3), np.float32))
    assert it.stats()["reasons"] == {"corrupt_media": 1} and f"{name} record" in it.stats()["examples"][0]


def test_config_and_meta_errors(files, processor, tmp_path):
  with pytest.raises(ValueError, match="unknown data config keys"):
    data.make_iterator({"meta": {}, "max_token": 3}, processor, batch_size=1, process_index=0, process_count=1)
  conf = cfg(files, {"good": {}}, template="internvl2_5", max_tiles=12)  # processor keys of a run's config
  assert data.DataConfig.from_any(conf).max_tokens == L
  with pytest.raises(ValueError, match="no meta given"):
    data.make_iterator({"meta": ""}, processor, batch_size=1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="exactly one of 'annotation'"):
    data.load_meta({"x": {"root": "/"}})
  path = tmp_path / "meta.json"
  path.write_text(json.dumps({"good": {"root": files["root"], "annotation": files["good"], "length": 12}}))
  specs = data.load_meta(str(path))
  assert specs[0].name == "good" and specs[0].repeat_time == 1.0 and specs[0].kind == "jsonl"
  it = data.make_eval_iterator(str(path), {"meta": "", "max_tokens": L, "max_tiles_per_row": R, "num_threads": 0},
                               processor, batch_size=2, process_index=0, process_count=1)
  empty = it.empty_batch()
  assert not empty["segment_ids"].any() and not empty["loss_weights"].any() and empty["num_tiles"].sum() == 0


def test_load_records_for_generation(files, processor):
  meta = {name: {"root": files["root"], "annotation": files[name]} for name in ("good", "video", "bad")}
  records = data.load_records(meta, limit=5)
  assert [r["dataset"] for r in records] == ["good", "bad", "good", "bad", "good"]  # in turn; no videos
  first = records[0]
  assert first["reference"] == "A red panda 0." and first["images"] == [f"{files['root']}/wide.png"]
  assert first["messages"] == GOOD[0][1][:1]
  assert records[2]["messages"][0]["value"] == "<image>\nWhat is this? 1"  # placeholder added
  out = processor(records[2]["messages"], images=records[2]["images"])  # the evaluator's call
  assert np.sum(out["input_ids"] == processor.tokenizer.image_token_id) == 4
  # bad.jsonl keeps lines 1, 2, 5, 6, 10, 11: line 3 is not JSON, 4 and 7 have no gpt turn, 8 and 9 are videos
  assert len(data.load_records(meta)) == 12 + 6
