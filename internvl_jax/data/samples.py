"""One record of a meta dataset -> one processed training sample, or the reason it was skipped.

The official `LazySupervisedDataset.__getitem__` picks the item kind (single image, several images, video,
pure text), puts a missing `<image>` / `<video>` placeholder in front of the first user turn, and
tokenizes; the processor does the tiling, template, labels and loss weights. A sample that cannot be used
becomes a `Skipped` with one of REASONS, never an exception, so one bad line cannot stop a run.

Pure-text samples carry no tiles (the official loader feeds a blank 224 px image with image_flags 0, which
contributes nothing to the loss; here the sample simply adds no tiles to its row).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from internvl_jax.inputs import dynamic_resolution as dr
from internvl_jax.inputs.labels import IGNORE

REASONS = ("missing_file", "corrupt_media", "bad_record", "too_long", "too_many_tiles", "no_targets", "error")


class SampleError(Exception):

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class Sample:
  """A processed sample; `key` is its position in this host's stream (what the iterator state stores)."""
  key: int
  input_ids: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32, -100 = not supervised; not shifted
  loss_weights: np.ndarray  # [n] float32, 1/sqrt(supervised tokens) on supervised tokens
  tiles: np.ndarray | None  # [t, S, S, 3] uint8 (see to_uint8; float32 if not EXACT), None for text only

  @property
  def num_tokens(self) -> int:
    return len(self.input_ids)

  @property
  def num_tiles(self) -> int:
    return 0 if self.tiles is None else len(self.tiles)


@dataclasses.dataclass
class Skipped:
  key: int
  reason: str
  where: str  # dataset name and line / record number
  message: str


# Buffered and prefetched samples hold their tiles as the uint8 pixels they were normalised from: 4x less
# memory than float32, and from_uint8 repeats dynamic_resolution.normalize's float32 arithmetic on the same
# integers, so the pixels come back bit-identical (EXACT checks every value at import; the tests check too).

def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Normalised float32 [..., 3] (ImageNet mean/std) -> the uint8 pixels it came from. float32 suffices: the
  error of undoing the normalisation is ~1e-4 of a grey level, far from the 0.5 that rounding tolerates."""
  x = pixels * dr.IMAGENET_STD
  x += dr.IMAGENET_MEAN
  x *= 255.0
  np.rint(x, out=x)
  np.clip(x, 0, 255, out=x)
  return x.astype(np.uint8)


def from_uint8(tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, the same float32 operations as normalize; written
  into `out` (float32, same shape) when given, to fill a batch without a temporary."""
  out = np.empty(tiles.shape, np.float32) if out is None else out
  if tiles.dtype != np.uint8:  # kept as float32 (see EXACT)
    out[...] = tiles
    return out
  np.divide(tiles, np.float32(255.0), out=out, dtype=np.float32)
  out -= dr.IMAGENET_MEAN
  out /= dr.IMAGENET_STD
  return out


_ALL = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]: every value
# Should normalize ever change its arithmetic, samples keep their float32 tiles rather than drift.
EXACT = (np.array_equal(to_uint8(dr.normalize([_ALL])), _ALL[None])
         and np.array_equal(from_uint8(_ALL), dr.normalize([_ALL])[0]))


def _first_user_turn(conversations) -> int:
  """The official code means the first non-system turn (it compares `value` to 'system', a slip)."""
  return next((i for i, m in enumerate(conversations) if m.get("from", m.get("role")) != "system"), 0)


def _with_placeholder(conversations, placeholder: str, count: int, prefix: str):
  """Put `prefix` in front of the first user turn when no turn holds the placeholder. (The official loader
  looks at the first turn only, so an image first mentioned in a later turn would get a second placeholder.)"""
  if any(placeholder in str(m.get("value", m.get("content", ""))) for m in conversations) or count == 0:
    return conversations
  conversations = [dict(m) for m in conversations]
  i = _first_user_turn(conversations)
  key = "value" if "value" in conversations[i] else "content"
  conversations[i][key] = prefix + str(conversations[i].get(key, ""))
  return conversations


def _images_of(record: dict) -> list:
  """The record's images: "image" as one item or a list; absent, "" or [] = none (the official test is
  `len(data_item['image']) != 0`). A decoded TFDS image (a uint8 array) is one image."""
  image = record.get("image")
  if image is None or (isinstance(image, (list, str, bytes)) and not len(image)):
    return []
  return list(image) if isinstance(image, list) else [image]


def _load_images(images, root: str):
  """Paths (relative to root), encoded bytes or uint8 arrays -> RGB PIL images, decoded here so that a
  missing or corrupt file is told apart from a bad conversation."""
  out = []
  for k, image in enumerate(images):
    if isinstance(image, str):
      image = os.path.join(root, image)
      if not os.path.exists(image):
        raise SampleError("missing_file", f"image {image} not found")
    try:
      out.append(dr.load_image(image, name=image if isinstance(image, str) else f"image {k}"))
    except ValueError as e:
      raise SampleError("corrupt_media", str(e)) from None
  return out


def process_record(record: dict, *, processor, root: str, rng: np.random.Generator, jpeg_augment: bool,
                   num_frames: tuple[int, int], max_tokens: int, max_tiles: int) -> dict:
  """A meta record -> the processor's training output (input_ids, labels, loss_weights, pixel_values,
  num_tiles). Raises SampleError(reason, message)."""
  conversations = record.get("conversations")
  if not isinstance(conversations, list) or not conversations or not all(isinstance(m, dict) for m in conversations):
    raise SampleError("bad_record", "'conversations' must be a non-empty list of {'from', 'value'} objects")
  images, video, videos = _images_of(record), record.get("video"), []
  if images:
    conversations = _with_placeholder(conversations, "<image>", len(images), "<image>\n" * len(images))
    images = _load_images(images, root)
  elif video:
    path = os.path.join(root, video)
    if not os.path.exists(path):
      raise SampleError("missing_file", f"video {path} not found")
    conversations = _with_placeholder(conversations, "<video>", 1, "<video>\n")
    videos = [path]
  # The official reader draws the frame count per video, randint(min_num_frame, max_num_frame).
  n_frames = int(rng.integers(num_frames[0], num_frames[1] + 1)) if videos else None
  try:
    out = processor(conversations, images=images, videos=videos, train=True, rng=rng, num_frames=n_frames,
                    jpeg_augment=jpeg_augment)
  except ValueError as e:  # images were decoded above; of the rest, only video decoding is the media's fault
    reason = "corrupt_media" if "cannot decode video" in str(e) else "bad_record"
    raise SampleError(reason, str(e)) from None
  n, tiles = len(out["input_ids"]), int(np.sum(out["num_tiles"]))
  if n > max_tokens:
    raise SampleError("too_long", f"{n} tokens, more than the row's {max_tokens}")
  if tiles > max_tiles:
    raise SampleError("too_many_tiles", f"{tiles} tiles, more than the row's {max_tiles}")
  if not np.any(out["labels"] != IGNORE):
    raise SampleError("no_targets", "no supervised token (no assistant turn with content)")
  return out


def question_of(record: dict, root: str) -> dict | None:
  """A record -> {'messages', 'images', 'reference'} for answering its last gpt turn, or None (video, no
  gpt turn, malformed). Placeholders are added as for training, so the prompt matches what was trained."""
  conversations = record.get("conversations")
  if record.get("video") or not isinstance(conversations, list) or not all(isinstance(m, dict) for m in conversations):
    return None
  last = max((i for i, m in enumerate(conversations) if m.get("from") == "gpt"), default=None)
  if last is None:
    return None
  images = _images_of(record)
  messages = _with_placeholder(conversations[:last], "<image>", len(images), "<image>\n" * len(images))
  images = [os.path.join(root, x) if isinstance(x, str) else x for x in images]
  return {"messages": messages, "images": images, "reference": str(conversations[last].get("value", ""))}


def to_sample(key: int, out: dict) -> Sample:
  pixels = out["pixel_values"]
  if pixels is not None and EXACT:
    pixels = to_uint8(pixels)
  return Sample(key, out["input_ids"].astype(np.int32), out["labels"].astype(np.int32),
                out["loss_weights"].astype(np.float32), pixels)
