"""Minimal safetensors reader and writer.

Our own because it needs what the `safetensors` package's numpy backend lacks: bfloat16 (through
ml_dtypes) and reading a slice of a tensor (strided views included) without reading the rest, so
neither a checkpoint nor one tensor of it has to fit in host memory.
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
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
# Bytes read at once by `read_into`: bounds the read buffer however large a tensor or its span is.
READ_CHUNK = 16 * 2**20


class SafetensorsFile:
  """One .safetensors file: `view(name)` is a tensor as a lazy view, `read_into(view, out)` reads it.

  The file is memory-mapped only to lend addresses: a view of the map carries transposes, reshapes and
  slices as strides, so a conversion applied to it stays lazy, and `read_into` turns the view's address
  range back into file offsets and reads that span with plain preads (at most READ_CHUNK bytes at a
  time). The mapped pages are never touched: pages read through a map stay resident (as RSS) until the
  map is dropped, a read buffer is freed as soon as its values are copied out.
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
    self._map = None

  def keys(self):
    return self.header.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def _checked(self, name: str) -> tuple[np.dtype, int, int]:
    info = self.header[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(DTYPES[info["dtype"]])
    count = (end - begin) // dtype.itemsize
    if count != int(np.prod(info["shape"], dtype=np.int64)):
      raise ValueError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, not shape {info['shape']}")
    return dtype, count, self.data_start + begin

  def get(self, name: str) -> np.ndarray:
    """The whole tensor, read into a fresh array."""
    dtype, count, offset = self._checked(name)
    array = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
    if array.size != count:
      raise ValueError(f"{self.path}: truncated file, tensor {name!r} is incomplete")
    return array.reshape(self.header[name]["shape"])

  def view(self, name: str) -> np.ndarray:
    """The tensor as a view of the file's map: nothing is read until `read_into`."""
    dtype, count, offset = self._checked(name)
    if self._map is None:
      self._map = np.memmap(self.path, np.uint8, mode="r")
    if offset + count * dtype.itemsize > self._map.size:
      raise ValueError(f"{self.path}: truncated file, tensor {name!r} is incomplete")
    return self._map[offset:offset + count * dtype.itemsize].view(dtype).reshape(self.header[name]["shape"])

  def holds(self, view: np.ndarray) -> bool:
    """Whether `view` points into this file's map (else it is an array in memory)."""
    if self._map is None or view.size == 0:
      return False
    lo, hi = _extent(view)
    base = self._map.ctypes.data
    return base <= lo and hi <= base + self._map.size

  def read_into(self, view: np.ndarray, out: np.ndarray) -> None:
    """out[...] = view, cast to out.dtype, reading only the bytes between the view's first and last element."""
    fd = os.open(self.path, os.O_RDONLY)
    try:
      self._gather(fd, view, out)
    finally:
      os.close(fd)

  def _gather(self, fd: int, view: np.ndarray, out: np.ndarray) -> None:
    lo, hi = _extent(view)
    if hi - lo > READ_CHUNK and view.size > 1:
      # Split along the axis with the largest stride: its pieces span the fewest bytes each.
      axis = max((a for a in range(view.ndim) if view.shape[a] > 1), key=lambda a: abs(view.strides[a]))
      n = view.shape[axis]
      step = max(1, min(READ_CHUNK // abs(view.strides[axis]), (n + 1) // 2))
      for s in range(0, n, step):
        idx = (slice(None),) * axis + (slice(s, s + step),)
        self._gather(fd, view[idx], out[idx])
      return
    buf = np.empty(hi - lo, np.uint8)
    done, offset = 0, lo - self._map.ctypes.data
    while done < buf.size:
      got = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
      if got <= 0:
        raise ValueError(f"{self.path}: truncated file")
      done += got
    ptr = view.__array_interface__["data"][0]
    out[...] = np.ndarray(view.shape, view.dtype, buf, offset=ptr - lo, strides=view.strides)


def _extent(view: np.ndarray) -> tuple[int, int]:
  """[first, last + 1) byte addresses of the elements of `view`."""
  lo = hi = view.__array_interface__["data"][0]
  for n, stride in zip(view.shape, view.strides):
    if stride < 0:
      lo += (n - 1) * stride
    else:
      hi += (n - 1) * stride
  return lo, hi + view.itemsize


class Checkpoint:
  """All tensors of a folder: `model.safetensors`, or shards listed by `model.safetensors.index.json`."""

  def __init__(self, folder: str):
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: SafetensorsFile(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
      self.where = {key: files[name] for key, name in weight_map.items()}
      self.files = list(files.values())
    else:
      paths = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
      if not paths:
        raise FileNotFoundError(f"{folder}: no *.safetensors file and no {INDEX}")
      self.files = [SafetensorsFile(os.path.join(folder, p)) for p in paths]
      self.where = {k: f for f in self.files for k in f.keys()}

  def keys(self):
    return self.where.keys()

  def shape(self, key):
    return self.where[key].shape(key)

  def get(self, key):
    return self.where[key].get(key)

  def view(self, key):
    return self.where[key].view(key)

  def file_of(self, view: np.ndarray) -> SafetensorsFile | None:
    return next((f for f in self.files if f.holds(view)), None)

  def read_into(self, view: np.ndarray, out: np.ndarray) -> None:
    """out[...] = view for a view of one of the files (or an array already in memory)."""
    if view.size == 0:
      return
    f = self.file_of(view)
    if f is None:
      out[...] = view
    else:
      f.read_into(view, out)


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
