"""InternVL's meta format and the record sources it names.

A meta file is a JSON object of datasets (the official `--meta_path` file):

  {"name": {"root": "images/", "annotation": "train.jsonl", "repeat_time": 1, "data_augment": false,
            "max_dynamic_patch": 12, "length": 1234}, ...}

Each annotation line is one sample: {"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4",
"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}, media paths relative to `root`;
a line with neither image nor video is a pure-text sample. `length` (a precomputed token count) is
accepted and ignored. Relative `root` / `annotation` paths are taken from the working directory, as in the
official code.

A TensorFlow Datasets source (ArrayRecord, read with `tfds.data_source`, no TensorFlow needed) is the second
input kind, an entry with `"tfds"` in place of `"annotation"`:

  {"name": {"tfds": "<prepared dataset folder, e.g. data/my_ds/1.0.0>", "split": "train", ...}}
  {"name": {"tfds": "my_ds", "data_dir": "data", "split": "train", ...}}   # by name, never downloaded

Its examples need a `conversations` feature (Text or bytes: the JSON list above) and may have an `image`
feature: encoded image bytes (`Tensor(shape=(), dtype=object)`; empty bytes = no image), a decoded
`Image()` (uint8 [H, W, 3]), or a `Sequence` of either for several images. Videos are JSONL-only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One entry of the meta file."""
  name: str
  annotation: str | None = None  # JSONL path (kind 'jsonl')
  root: str = ""
  tfds: str | None = None  # a prepared dataset folder, or a dataset name with data_dir (kind 'tfds')
  data_dir: str | None = None
  split: str = "train"
  repeat_time: float = 1.0
  data_augment: bool = False  # JPEG re-encoding per tile (the official is_train transform)
  max_dynamic_patch: int | None = None  # per-dataset tile limit; None = the processor's

  @property
  def kind(self) -> str:
    return "tfds" if self.tfds else "jsonl"


_KNOWN = {f.name for f in dataclasses.fields(DatasetSpec)} | {"length"}


def load_meta(meta) -> list[DatasetSpec]:
  """A meta file path, or its already-parsed dict -> dataset specs in file order."""
  if isinstance(meta, (str, os.PathLike)):
    if not str(meta):
      raise ValueError("no meta given: set the data config's `meta` to a meta JSON file or dict")
    with open(meta) as f:
      meta = json.load(f)
  if not isinstance(meta, dict) or not meta:
    raise ValueError("the meta must be a non-empty JSON object of datasets")
  specs = []
  for name, entry in meta.items():
    entry = dict(entry)
    unknown = sorted(set(entry) - _KNOWN)
    if unknown:
      raise ValueError(f"meta dataset {name!r}: unknown keys {unknown} (known: {sorted(_KNOWN)})")
    if bool(entry.get("annotation")) == bool(entry.get("tfds")):
      raise ValueError(f"meta dataset {name!r}: give exactly one of 'annotation' (JSONL) and 'tfds'")
    entry.pop("length", None)
    repeat = float(entry.pop("repeat_time", 1.0))
    if not repeat > 0:
      raise ValueError(f"meta dataset {name!r}: repeat_time must be positive, got {repeat}")
    mdp = entry.pop("max_dynamic_patch", None)
    specs.append(DatasetSpec(name=name, repeat_time=repeat, max_dynamic_patch=None if mdp is None else int(mdp),
                             **entry))
  return specs


def repeat_indices(n: int, repeat_time: float, rng: np.random.Generator) -> np.ndarray:
  """Record indices of one epoch of a dataset with `repeat_time`: floor(r) full copies, plus a random
  subset (without replacement, kept in file order) of int(n * frac(r)) records.

  The official InternVL2.5 finetune and the 3.5 MPO scripts take `random.sample(raw, int(n * r))` for
  r < 1 and drop the fraction above 1 (`raw * int(r)`); one later script adds `random.sample` of the
  fraction, which is what this does. (The 3.5 gpt-oss finetune script takes the first int(n * r) lines.)"""
  whole = int(math.floor(repeat_time))
  extra = int(n * (repeat_time - whole))
  subset = np.sort(rng.choice(n, size=extra, replace=False)) if extra else np.zeros(0, np.int64)
  return np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole), subset.astype(np.int64)])


def name_seed(name: str) -> int:
  """A per-dataset seed component that is stable across processes (Python's hash() is salted)."""
  return zlib.crc32(name.encode())


# ------------------------------------------------------------------------------------------ sources

class JsonlSource:
  """Random access to the non-blank lines of a JSONL file, by byte offset (the file is not held in memory)."""

  def __init__(self, spec: DatasetSpec):
    self.spec, self.name, self.root = spec, spec.name, spec.root
    self.path = spec.annotation
    offsets, lines, pos = [], [], 0
    with open(self.path, "rb") as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          offsets.append(pos)
          lines.append(number)
        pos += len(line)
    self._offsets, self._lines = np.asarray(offsets, np.int64), np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, i: int) -> str:
    return f"{self.name} line {int(self._lines[i])}"

  def record(self, i: int) -> dict:
    """-> the parsed line; ValueError if it is not a JSON object."""
    with open(self.path, "rb") as f:
      f.seek(int(self._offsets[i]))
      line = f.readline()
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"not JSON: {e}") from None
    if not isinstance(record, dict):
      raise ValueError(f"a line must be a JSON object, got {type(record).__name__}")
    return record


class TfdsSource:
  """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord files, TensorFlow not needed).
  Records come back in the same shape as JSONL lines, with images as bytes or uint8 arrays."""

  def __init__(self, spec: DatasetSpec):
    try:
      import tensorflow_datasets as tfds  # lazy: only TFDS inputs need it
    except ImportError as e:
      raise ImportError(f"meta dataset {spec.name!r} is a TFDS source: pip install tensorflow-datasets "
                        f"array_record ({e})") from None
    self.spec, self.name, self.root = spec, spec.name, ""
    if spec.data_dir:
      self._ds = tfds.data_source(spec.tfds, split=spec.split, data_dir=spec.data_dir, download=False)
    else:
      self._ds = tfds.builder_from_directory(spec.tfds).as_data_source(split=spec.split)

  def __len__(self) -> int:
    return len(self._ds)

  def where(self, i: int) -> str:
    return f"{self.name} record {i}"

  def record(self, i: int) -> dict:
    example = self._ds[i]
    conversations = example["conversations"]
    if isinstance(conversations, (bytes, np.bytes_)):
      conversations = conversations.decode()
    try:
      record = {"conversations": json.loads(conversations) if isinstance(conversations, str) else conversations}
    except json.JSONDecodeError as e:
      raise ValueError(f"conversations is not JSON: {e}") from None
    image = example.get("image")
    if isinstance(image, list) or (isinstance(image, np.ndarray) and image.dtype == object):
      image = [x for x in image if len(x)]
    elif image is not None and not len(image):
      image = None
    if image is not None and len(image):
      record["image"] = image
    return record


def open_source(spec: DatasetSpec):
  return TfdsSource(spec) if spec.kind == "tfds" else JsonlSource(spec)
