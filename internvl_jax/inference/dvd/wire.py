"""DvD's messages (paper §2.5): tiles go from the language server to a vision server, features come back.

Every message is two ZeroMQ frames: a UTF-8 JSON header and a raw array (C order, little-endian, `dtype` and
`shape` named in the header; an empty frame when there is none). WORKSPACE.md ("DvD") has the table.

  tiles    (language -> vision)  id, v, tiles, dtype, shape [tiles, H, W, 3], route (Flash: let the router
                                 decide per tile), feature_dtype (what to send back)
  features (vision -> language)  id, v, tiles, dtype, shape [tokens, d], compressed (per tile, null without
                                 routing), timing {queue_s, compute_s, batch_tiles}
  error    (vision -> language)  id, v, message (the request failed on the vision side)

A features message holds the rows for the request's <IMG_CONTEXT> slots in order: per tile all T of its
tokens, or the C of its compressed tokens when the router compressed it (T, C from `vir.tile_tokens`).
`parse_features` checks everything it can against what the language side asked for and raises `BadMessage`
naming the field, so that a wrong-shaped reply is never scattered into a prompt.
"""
from __future__ import annotations

import dataclasses
import json
import math

import ml_dtypes
import numpy as np

VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
KINDS = ("tiles", "features", "error")
MAX_HEADER = 1 << 16  # bytes; a header is a few hundred


class BadMessage(ValueError):
  """A message that does not follow the schema, or does not answer what was asked."""


def encode(kind: str, rid: str, array: np.ndarray | None = None, **fields) -> list:
  header = {"v": VERSION, "kind": kind, "id": rid, **fields}
  if array is None:
    return [json.dumps(header).encode(), b""]
  array = np.ascontiguousarray(array)
  name = next((n for n, d in DTYPES.items() if d == array.dtype), None)
  if name is None:
    raise ValueError(f"arrays on the wire are {', '.join(DTYPES)}; got {array.dtype}")
  header.update(dtype=name, shape=list(array.shape))
  return [json.dumps(header).encode(), memoryview(array.reshape(-1).view(np.uint8))]


def decode(frames) -> tuple[dict, np.ndarray | None]:
  """(header, array or None) of a message, with the schema's own checks (not yet against the request)."""
  if len(frames) != 2:
    raise BadMessage(f"a message has 2 frames (header, array), got {len(frames)}")
  if len(frames[0]) > MAX_HEADER:
    raise BadMessage(f"header of {len(frames[0])} bytes, over {MAX_HEADER}")
  try:
    header = json.loads(bytes(frames[0]))
  except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deep
    raise BadMessage(f"header is not JSON: {type(e).__name__}: {e}") from None
  if not isinstance(header, dict):
    raise BadMessage(f"header is a JSON {type(header).__name__}, not an object")
  if header.get("v") != VERSION:
    raise BadMessage(f"header field 'v' is {header.get('v')!r}; this side speaks version {VERSION}")
  if not isinstance(header.get("kind"), str) or header["kind"] not in KINDS or not isinstance(header.get("id"), str):
    raise BadMessage(f"header fields 'kind' ({header.get('kind')!r}, one of {KINDS}) and 'id' (a string) are needed")
  payload = memoryview(frames[1]).cast("B")
  if "dtype" not in header and "shape" not in header:
    if len(payload):
      raise BadMessage(f"{len(payload)} payload bytes, but the header names no dtype and shape")
    return header, None
  name, shape = header.get("dtype"), header.get("shape")
  dtype = DTYPES.get(name) if isinstance(name, str) else None
  if dtype is None:
    raise BadMessage(f"header field 'dtype' is {header.get('dtype')!r}, not one of {', '.join(DTYPES)}")
  if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
    raise BadMessage(f"header field 'shape' is {shape!r}, not a list of sizes")
  size = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
  if size != len(payload):
    raise BadMessage(f"shape {shape} of {header['dtype']} is {size} bytes, the payload {len(payload)}")
  return header, np.frombuffer(payload, dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Tiles:
  id: str
  pixels: np.ndarray  # float32 [tiles, H, W, 3]
  route: bool
  feature_dtype: str


def tiles_message(rid: str, pixels: np.ndarray, *, route: bool, feature_dtype: str) -> list:
  if feature_dtype not in DTYPES:
    raise ValueError(f"feature_dtype must be one of {', '.join(DTYPES)}, got {feature_dtype!r}")
  pixels = np.asarray(pixels, np.float32)
  return encode("tiles", rid, pixels, tiles=len(pixels), route=bool(route), feature_dtype=feature_dtype)


def parse_tiles(frames) -> Tiles:
  header, pixels = decode(frames)
  if header["kind"] != "tiles":
    raise BadMessage(f"expected a 'tiles' message, got {header['kind']!r}")
  if pixels is None or pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.float32:
    raise BadMessage(f"request {header['id']}: tiles must be float32 [tiles, H, W, 3], got "
                     f"{None if pixels is None else (pixels.dtype.name, list(pixels.shape))}")
  if header.get("tiles") != len(pixels) or not len(pixels):
    raise BadMessage(f"request {header['id']}: header says {header.get('tiles')!r} tiles, the array holds {len(pixels)}")
  if not isinstance(header.get("feature_dtype"), str) or header["feature_dtype"] not in DTYPES \
      or not isinstance(header.get("route"), bool):
    raise BadMessage(f"request {header['id']}: 'feature_dtype' must be one of {', '.join(DTYPES)} and 'route' a bool")
  return Tiles(header["id"], pixels, header["route"], header["feature_dtype"])


@dataclasses.dataclass(frozen=True)
class Features:
  id: str
  array: np.ndarray  # [tokens, d], the rows of the request's <IMG_CONTEXT> slots in order
  compressed: np.ndarray | None  # bool [tiles]: the router's decision, None when not routed
  timing: dict


class RemoteError(RuntimeError):
  """The vision server answered with an error message."""


def features_message(rid: str, array: np.ndarray, *, compressed=None, timing=None) -> list:
  return encode("features", rid, array, compressed=None if compressed is None else [bool(c) for c in compressed],
                timing=timing or {})


def error_message(rid: str, message: str) -> list:
  return encode("error", rid, message=message)


def parse_features(frames, *, rid: str, tiles: int, dim: int, tokens: tuple[int, int], route: bool,
                   dtype: str | None = None) -> Features:
  """A reply to request `rid` of `tiles` tiles, checked against it: `dtype` (the feature_dtype asked for),
  rows of width `dim` (the LLM's hidden size), T or C rows per tile (tokens = (T, C)) as `compressed` says,
  finite values, timing as non-negative numbers. An 'error' reply raises RemoteError; anything else that does
  not fit raises BadMessage."""
  header, array = decode(frames)
  where = f"features for request {rid}"
  if header["id"] != rid:
    raise BadMessage(f"{where}: the reply names request {header['id']!r}")
  if header["kind"] == "error":
    raise RemoteError(str(header.get("message", "no message")))
  if header["kind"] != "features" or array is None:
    raise BadMessage(f"{where}: expected a 'features' message with an array, got {header['kind']!r}")
  compressed = header.get("compressed")
  if compressed is not None:
    if not route:
      raise BadMessage(f"{where}: routed ('compressed' given) although routing was not asked for")
    if not (isinstance(compressed, list) and len(compressed) == tiles and all(isinstance(c, bool) for c in compressed)):
      raise BadMessage(f"{where}: 'compressed' must list {tiles} booleans, got {compressed!r}")
    compressed = np.asarray(compressed, bool)
  elif route:
    raise BadMessage(f"{where}: routing was asked for and 'compressed' is missing")
  rows = tiles * tokens[0] if compressed is None else int(np.where(compressed, tokens[1], tokens[0]).sum())
  if array.shape != (rows, dim):
    raise BadMessage(f"{where}: shape {list(array.shape)}, expected [{rows}, {dim}] ({tiles} tiles"
                     f"{'' if compressed is None else f', {int(compressed.sum())} compressed'})")
  if dtype is not None and header["dtype"] != dtype:
    raise BadMessage(f"{where}: dtype {header['dtype']}, asked for {dtype}")
  if not np.isfinite(array).all():
    raise BadMessage(f"{where}: {int((~np.isfinite(array)).sum())} values are not finite")
  timing = header.get("timing", {})
  if not (isinstance(timing, dict) and all(
      isinstance(timing.get(k, 0), (int, float)) and not isinstance(timing.get(k, 0), bool)
      and math.isfinite(timing.get(k, 0)) and timing.get(k, 0) >= 0 for k in ("queue_s", "compute_s", "batch_tiles"))):
    raise BadMessage(f"{where}: 'timing' must hold non-negative finite queue_s, compute_s, batch_tiles; got {timing!r}")
  return Features(rid, array, compressed, {k: timing[k] for k in ("queue_s", "compute_s", "batch_tiles") if k in timing})
