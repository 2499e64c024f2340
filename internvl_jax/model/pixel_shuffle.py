"""Pixel shuffle, ps_version 'v2' (REFERENCE.md §2.3): trade spatial resolution for channels.

With r = 1/scale, output[i, j] = concat over the r x r neighbourhood (row-major: dr, then dc) of
x[r*i + dr, r*j + dc]; channel index = (dr * r + dc) * C + c. scale 0.5: 32x32 -> 16x16 (256 tokens per
tile, 4C channels); scale 0.25 (Flash / ViR): 32x32 -> 8x8 (64 tokens, 16C channels).
"""
from __future__ import annotations

import einops
import jax


def pixel_shuffle(x: jax.Array, scale: float) -> jax.Array:
  """x [tiles, h, w, C] -> [tiles, h*scale, w*scale, C/scale^2]."""
  t, h, w, c = x.shape
  r = int(round(1 / scale))
  if abs(r * scale - 1) > 1e-9 or h % r or w % r:
    raise ValueError(f"pixel_shuffle: scale {scale} must be 1/r with r dividing the grid {h}x{w}")
  return einops.rearrange(x, "t (h dr) (w dc) c -> t h w (dr dc c)", dr=r, dc=r)
