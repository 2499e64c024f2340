"""Minimal safetensors reader and writer.

Our own because it needs two things the `safetensors` package's numpy backend lacks: bfloat16 (through
ml_dtypes) and one-tensor-at-a-time access, so a checkpoint never has to fit in host memory.
Format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class SafetensorsFile:
  """One .safetensors file; `get(name)` reads one tensor into a fresh array.

  Plain reads rather than a memory map: mapped pages stay resident in the process (as RSS) until the
  map is dropped, while a read buffer is freed as soon as the tensor has been placed on its device.
  """

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    self.header, self.data_start = header, 8 + n

  def keys(self):
    return self.header.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(DTYPES[info["dtype"]])
    count = (end - begin) // dtype.itemsize
    if count != int(np.prod(info["shape"], dtype=np.int64)):
      raise ValueError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, not shape {info['shape']}")
    array = np.fromfile(self.path, dtype=dtype, count=count, offset=self.data_start + begin)
    if array.size != count:
      raise ValueError(f"{self.path}: truncated file, tensor {name!r} is incomplete")
    return array.reshape(info["shape"])


class Checkpoint:
  """All tensors of a folder: `model.safetensors`, or shards listed by `model.safetensors.index.json`."""

  def __init__(self, folder: str):
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: SafetensorsFile(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
      self.where = {key: files[name] for key, name in weight_map.items()}
    else:
      paths = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
      if not paths:
        raise FileNotFoundError(f"{folder}: no *.safetensors file and no {INDEX}")
      self.where = {k: f for f in (SafetensorsFile(os.path.join(folder, p)) for p in paths) for k in f.keys()}

  def keys(self):
    return self.where.keys()

  def shape(self, key):
    return self.where[key].shape(key)

  def get(self, key):
    return self.where[key].get(key)


def write(folder: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, callable]],
          max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write tensors given as (name, shape, dtype, make) where make() returns the array, one at a time.

  Shards by size; more than one shard also writes the index. Returns the file names written.
  """
  entries = list(tensors)
  shards, size = [[]], 0
  for e in entries:
    nbytes = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  for old in os.listdir(folder):  # an earlier export's index would otherwise shadow the new files
    if old.startswith("model") and (old.endswith(".safetensors") or old == INDEX):
      os.remove(os.path.join(folder, old))
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    total += _write_file(os.path.join(folder, name), shard)
    weight_map.update({e[0]: name for e in shard})
  if len(shards) > 1:
    with open(os.path.join(folder, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def _write_file(path: str, entries) -> int:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype, _ in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, make in entries:
      array = np.ascontiguousarray(make(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, declared {tuple(shape)}")
      f.write(array.tobytes())
  return offset
