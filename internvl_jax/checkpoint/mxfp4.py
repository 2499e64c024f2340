"""MXFP4 dequantization of GPT-OSS expert tensors, as the base gpt-oss-20b/120b release stores them.

Each expert tensor `X` (`model.layers.L.mlp.experts.gate_up_proj`, `...down_proj`) is stored as two entries:
`X_blocks` (uint8 [E, out, G, 16]: 32 FP4 e2m1 values per group, two per byte, low nibble first) and
`X_scales` (uint8 [E, out, G]: one E8M0 exponent per group of 32, value 2^(s - 127)); see the OCP
Microscaling Formats (MX) v1.0 spec (e2m1 element values, E8M0 shared scale, block size 32).

Mirrors transformers `integrations/mxfp4.py::convert_moe_packed_tensors` (transformers 5.x), which is what
its dequantizing load (`Mxfp4Config(dequantize=True)` -> `Mxfp4Dequantize` -> `dequantize_convertops`)
puts into `GptOssExperts` unchanged: per row, value[2j] = FP4_VALUES[byte[j] & 0xF] and value[2j+1] =
FP4_VALUES[byte[j] >> 4], times 2^(s - 127); the [E, out, G*32] result is then `.transpose(1, 2)`-ed
inside that function, giving the module's [E, in, out] layout: gate_up_proj [E, d, 2I], down_proj [E, I, d].
The loader applies no further transposition. Like transformers (`torch.ldexp`), s = 255 (NaN in the spec)
is treated as 2^128 in a true float32 ldexp: 0 stays 0, +-0.5 -> +-2^127, larger -> +-inf; s = 0 gives
float32 subnormals. Realistic checkpoints use neither.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_LUT = np.asarray(FP4_VALUES, np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32, rows_per_chunk: int = 2048) -> np.ndarray:
  """uint8 blocks [E, out, G, 16] and scales [E, out, G] -> [E, G*32, out] in `dtype`
  (gate_up_proj: [E, 2I, d/32, 16] -> [E, d, 2I]; down_proj: [E, d, I/32, 16] -> [E, I, d]).

  Works through `rows_per_chunk` rows of one expert at a time, so the only full-size array is the result.
  Every value is exact in float32/bfloat16 (e2m1 has 2 significant bits); float16 rounds/overflows like a
  cast from float32, as transformers does.
  """
  blocks, scales = np.asarray(blocks), np.asarray(scales)
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
  if blocks.ndim != 4 or blocks.shape[-1] != 16:
    raise ValueError(f"MXFP4 blocks must be [E, rows, groups, 16], got shape {blocks.shape}")
  if scales.shape != blocks.shape[:-1]:
    raise ValueError(f"MXFP4 scales shape {scales.shape} does not match blocks shape {blocks.shape} "
                     f"(expected {blocks.shape[:-1]})")
  if rows_per_chunk < 1:
    raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
  n_exp, rows, groups, _ = blocks.shape
  out = np.empty((n_exp, groups * 32, rows), dtype)
  with np.errstate(over="ignore"):  # s = 255 and float16 overflow: silent, as in torch
    for e in range(n_exp):
      _fill(out[e], blocks[e], scales[e], rows_per_chunk)
  return out


def _fill(out: np.ndarray, blocks: np.ndarray, scales: np.ndarray, rows_per_chunk: int) -> None:
  """One expert: blocks [out, G, 16], scales [out, G] -> out [G*32, out]."""
  rows, groups, _ = blocks.shape
  for r0 in range(0, rows, rows_per_chunk):
    r1 = min(r0 + rows_per_chunk, rows)
    blk = blocks[r0:r1]
    vals = np.empty((r1 - r0, groups, 32), np.float32)
    vals[..., 0::2] = _LUT[blk & 0x0F]  # low nibble first
    vals[..., 1::2] = _LUT[blk >> 4]
    np.ldexp(vals, scales[r0:r1, :, None].astype(np.int32) - 127, out=vals)  # exact, like torch.ldexp
    out[:, r0:r1] = vals.reshape(r1 - r0, groups * 32).T


def is_mxfp4_key(key: str) -> bool:
  return key.endswith(("_blocks", "_scales"))


def pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
  """{base_key: (base_key + '_blocks', base_key + '_scales')} for the MXFP4 entries among `keys`;
  ValueError naming the key whose partner is missing."""
  keys = set(keys)
  found = {}
  for key in sorted(k for k in keys if is_mxfp4_key(k)):
    base, suffix = key[:-len("_blocks")], key[-len("_blocks"):]
    partner = base + ("_scales" if suffix == "_blocks" else "_blocks")
    if partner not in keys:
      raise ValueError(f"MXFP4 tensor {key!r} has no matching {partner!r} in the checkpoint")
    found[base] = (base + "_blocks", base + "_scales")
  return found


class Packed:
  """The dequantized [E, G*32, out] tensor of lazy blocks/scales views (`pretrained.tensor_sources`), kept
  lazy like `keys.Stacked`: slicing narrows the views (whole groups of 32 along the input dimension, the cut
  inside them remembered), so a device's shard reads and dequantizes only its own rows."""

  def __init__(self, blocks, scales, cut: slice | None = None):
    if blocks.ndim != 4 or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
      raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)}: expected "
                       "[E, rows, groups, 16] and [E, rows, groups]")
    self.blocks, self.scales = blocks, scales
    e, rows, groups, _ = blocks.shape
    self.cut = cut or slice(0, groups * 32)
    self.shape = (e, self.cut.stop - self.cut.start, rows)
    self.ndim, self.dtype = 3, np.dtype(np.float32)

  def __getitem__(self, index) -> "Packed":
    index = (index if isinstance(index, tuple) else (index,)) + (slice(None),) * 3
    e, i, o = index[:3]
    if not all(isinstance(s, slice) and s.step in (None, 1) for s in (e, i, o)):
      raise TypeError(f"Packed takes up to 3 unit-step slices, got {index[:3]!r}")
    start, stop, _ = i.indices(self.shape[1])
    start, stop = start + self.cut.start, stop + self.cut.start
    g0, g1 = start // 32, -(-stop // 32)
    return Packed(self.blocks[e, o, g0:g1], self.scales[e, o, g0:g1], slice(start - g0 * 32, stop - g0 * 32))

  def reshape(self, *shape) -> "Packed":
    """Only to its own shape (what `keys.plain` asks of the experts, which keep transformers' layout)."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
    if shape != self.shape:
      raise ValueError(f"an MXFP4 tensor of shape {self.shape} cannot be reshaped to {shape}")
    return self

  def dequantize(self, read) -> np.ndarray:
    """read(view) -> the view's values as an array (the checkpoint reader) -> [E, in, out] float32."""
    return dequantize(read(self.blocks), read(self.scales))[:, self.cut]

  def __array__(self, dtype=None, copy=None):
    return self.dequantize(np.asarray).astype(dtype or self.dtype, copy=False)
