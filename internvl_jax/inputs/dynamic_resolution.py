"""Dynamic High Resolution (InternVL 1.5; REFERENCE.md §4): an image becomes a grid of 448 px tiles plus a
thumbnail, chosen to match its aspect ratio, as the released models were trained.

`tile_grid` picks (cols, rows) exactly as the official `find_closest_aspect_ratio` (same candidate order,
same tie-break); `dynamic_preprocess` resizes (PIL bicubic), crops row-major, appends the thumbnail and
normalises with ImageNet mean/std into float32 NHWC.
"""
from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> tuple[tuple[int, int], ...]:
  """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in the official order.

  The official code builds a Python set and stably sorts it by tile count, so the order among grids
  with equal tile counts is CPython's set iteration order; building the set the same way reproduces it.
  """
  if not 1 <= min_tiles <= max_tiles:
    raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
  grids = set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_tiles <= i * j <= max_tiles)
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448):
  """-> (cols, rows): the grid whose aspect ratio is closest to width/height; among grids of exactly that
  ratio a later (larger) one wins only when the image area exceeds half of the grid's canvas."""
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got {width}x{height}")
  aspect = width / height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in candidate_grids(min_tiles, max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
      best = (cols, rows)
  return best


def to_rgb(image: Image.Image) -> Image.Image:
  """`image.convert('RGB')`, as the official loaders do: CMYK, palette, grey and alpha images alike (alpha
  is dropped, not composited, so pixels match what the released models were trained on)."""
  return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source, *, name: str | None = None) -> Image.Image:
  """A PIL RGB image from a path, bytes, a numpy uint8 [H, W, 3] array or a PIL image; errors name it."""
  name = name or (source if isinstance(source, (str, os.PathLike)) else type(source).__name__)
  try:
    if isinstance(source, Image.Image):
      image = source
    elif isinstance(source, np.ndarray):
      image = Image.fromarray(source)
    elif isinstance(source, (bytes, bytearray)):
      image = Image.open(io.BytesIO(source))
    else:
      image = Image.open(source)
    image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
    raise ValueError(f"cannot read image {name}: {e}") from None
  if image.width == 0 or image.height == 0:
    raise ValueError(f"image {name} has zero size ({image.width}x{image.height})")
  return to_rgb(image)


def jpeg_reencode(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Training augmentation: re-encode as JPEG at a quality drawn uniformly from 75..100. The processor
  applies it to each tile after tiling, as the official per-tile `build_transform` does."""
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=int(rng.integers(75, 101)))
  return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def normalize(tiles: list[Image.Image]) -> np.ndarray:
  """PIL tiles -> float32 [n, H, W, 3], (x / 255 - mean) / std."""
  x = np.stack([np.asarray(t, np.float32) for t in tiles]) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def dynamic_preprocess(image, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448,
                       use_thumbnail: bool = True) -> np.ndarray:
  """An image (PIL, path, bytes or uint8 array) -> normalised tiles float32 [n, tile_size, tile_size, 3]:
  the grid's tiles row-major, then a thumbnail of the whole image when the grid has more than one tile."""
  image = load_image(image)
  return normalize(crop_tiles(image, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size,
                              use_thumbnail=use_thumbnail))


def crop_tiles(image: Image.Image, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448,
               use_thumbnail: bool = True) -> list[Image.Image]:
  cols, rows = tile_grid(image.width, image.height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
  resized = image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
  tiles = [resized.crop(((k % cols) * tile_size, (k // cols) * tile_size,
                         (k % cols + 1) * tile_size, (k // cols + 1) * tile_size)) for k in range(cols * rows)]
  if use_thumbnail and len(tiles) != 1:
    tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
  return tiles
