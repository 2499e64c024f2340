"""Greedy packing of samples into fixed-size rows (REFERENCE.md §6.2) and the batch contract.

A row holds whole samples, at most `max_tokens` tokens and `max_tiles` tiles. The packer keeps up to
`buffer_size` open rows: a sample joins the first open row it fits (tokens and tiles); when none fits and
the buffer is full, the fullest row (most tokens, then most tiles, then oldest) is emitted and the sample
opens a new row. A row that reaches max_tokens is emitted at once. Samples never attend to each other:
each keeps its own segment id and positions 0..n-1. (The official `PackedDataset` also splits samples
longer than a row and pads rows with blank images; here over-long samples are skipped before packing, and
a row's unused tile slots are zero tiles that its tokens never reference.)
"""
from __future__ import annotations

import collections

import numpy as np

from internvl_jax.data.samples import Sample, from_uint8
from internvl_jax.inputs.labels import IGNORE


class _Row:

  def __init__(self):
    self.samples: list[Sample] = []
    self.tokens = self.tiles = 0

  def add(self, sample: Sample):
    self.samples.append(sample)
    self.tokens += sample.num_tokens
    self.tiles += sample.num_tiles


class Packer:
  """Open rows plus the queue of finished rows, in the order they were finished."""

  def __init__(self, max_tokens: int, max_tiles: int, *, buffer_size: int = 20, pack: bool = True):
    if max_tokens <= 0 or max_tiles < 0 or buffer_size <= 0:
      raise ValueError(f"need max_tokens > 0, max_tiles >= 0, buffer_size > 0; got {max_tokens}, {max_tiles}, "
                       f"{buffer_size}")
    self.max_tokens, self.max_tiles = max_tokens, max_tiles
    self.buffer_size, self.pack = buffer_size, pack
    self.open: list[_Row] = []
    self.ready: collections.deque[_Row] = collections.deque()

  def _fits(self, row: _Row, sample: Sample) -> bool:
    return row.tokens + sample.num_tokens <= self.max_tokens and row.tiles + sample.num_tiles <= self.max_tiles

  def add(self, sample: Sample) -> None:
    """The caller has checked that the sample alone fits a row."""
    if not self._fits(_Row(), sample):
      raise ValueError(f"sample {sample.key} ({sample.num_tokens} tokens, {sample.num_tiles} tiles) cannot fit "
                       f"a row of {self.max_tokens} tokens and {self.max_tiles} tiles")
    if not self.pack:
      row = _Row()
      row.add(sample)
      self.ready.append(row)
      return
    row = next((r for r in self.open if self._fits(r, sample)), None)
    if row is None:
      if len(self.open) >= self.buffer_size:
        fullest = max(range(len(self.open)), key=lambda i: (self.open[i].tokens, self.open[i].tiles, -i))
        self.ready.append(self.open.pop(fullest))
      row = _Row()
      self.open.append(row)
    row.add(sample)
    if row.tokens == self.max_tokens:
      self.open.remove(row)
      self.ready.append(row)

  def flush(self) -> None:
    """End of data: every open row is finished, oldest first."""
    self.ready.extend(self.open)
    self.open = []

  def take(self, n: int) -> list[list[Sample]]:
    return [self.ready.popleft().samples for _ in range(min(n, len(self.ready)))]

  def state(self) -> dict:
    """The stream keys of the samples in each open and finished row; samples are rebuilt from their keys."""
    keys = lambda rows: [[s.key for s in r.samples] for r in rows]
    return {"open": keys(self.open), "ready": keys(self.ready)}

  def restore(self, state: dict, fetch) -> None:
    """Rebuild the rows of `state()`; fetch(key) -> Sample, or None when it can no longer be processed."""

    def rows(keys):
      out = []
      for row_keys in keys:
        row = _Row()
        for key in row_keys:
          sample = fetch(key)
          if sample is not None:
            row.add(sample)
        if row.samples:
          out.append(row)
      return out

    self.open, self.ready = rows(state["open"]), collections.deque(rows(state["ready"]))


def make_batch(rows: list[list[Sample]], *, batch_size: int, max_tokens: int, max_tiles: int, pad_id: int,
               tile_size: int) -> dict:
  """Rows of samples -> host-local numpy arrays (B = batch_size, L = max_tokens, R = max_tiles, S = tile_size):

    input_ids [B, L] int32 (pad_id at padding), labels [B, L] int32 (-100 at padding and unsupervised
    tokens; not shifted), loss_weights [B, L] float32 (each sample's own 1/sqrt(N), 0 at padding),
    segment_ids [B, L] int32 (1, 2, ... per sample, 0 = padding), position_ids [B, L] int32 (0..n-1 per
    sample, 0 at padding), pixel_values [B, R, S, S, 3] float32 (the row's tiles in token order, then zero
    tiles; absent when R == 0), num_tiles [B] int32 (real tiles per row).

  Missing rows (fewer than batch_size, at the end of finite data) are all padding."""
  B, L, R = batch_size, max_tokens, max_tiles
  out = {"input_ids": np.full((B, L), pad_id, np.int32), "labels": np.full((B, L), IGNORE, np.int32),
         "loss_weights": np.zeros((B, L), np.float32), "segment_ids": np.zeros((B, L), np.int32),
         "position_ids": np.zeros((B, L), np.int32), "num_tiles": np.zeros((B,), np.int32)}
  if R:
    out["pixel_values"] = np.zeros((B, R, tile_size, tile_size, 3), np.float32)
  for b, row in enumerate(rows):
    t = k = 0
    for segment, s in enumerate(row, 1):
      n = s.num_tokens
      out["input_ids"][b, t:t + n] = s.input_ids
      out["labels"][b, t:t + n] = s.labels
      out["loss_weights"][b, t:t + n] = s.loss_weights
      out["segment_ids"][b, t:t + n] = segment
      out["position_ids"][b, t:t + n] = np.arange(n)
      if s.num_tiles:
        from_uint8(s.tiles, out=out["pixel_values"][b, k:k + s.num_tiles])
      t, k = t + n, k + s.num_tiles
    out["num_tiles"][b] = k
  return out
