"""The training input pipeline: meta datasets -> shuffled, host-sharded stream -> processor -> packing -> batches.

Order of operations (every step deterministic given the seed):
  1. A global index space over all datasets, each repeated / subsampled by its repeat_time (meta.py).
  2. A permutation of it per epoch (grain `MapDataset.shuffle(seed).repeat()`: epoch e uses seed + e).
  3. Host sharding: host i of P takes global stream positions i, i + P, i + 2P, ... (disjoint, covering).
  4. Processing on grain's prefetch threads, sample at position p with np.random.default_rng([seed, p]),
     so augmentation and video frame choice are reproducible and differ between epochs.
  5. Packing into rows (packing.py), `batch_size` rows per host-local batch.

A sample that fails (missing file, corrupt media, bad record, too long, too many tiles, nothing supervised)
is skipped and counted (`stats()`); only `max_consecutive_skips` failures in a row stop the run (a wrong
`root` should not spin forever). The iterator state is the host's next stream position plus the stream keys
of the samples waiting in the packer, which are re-processed on restore: restoring reproduces exactly the
batches the uninterrupted iterator would have produced.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import itertools
import logging

import numpy as np

from internvl_jax.data import meta as meta_lib
from internvl_jax.data import samples as samples_lib
from internvl_jax.data.packing import Packer, make_batch

log = logging.getLogger(__name__)


# Read by whoever builds the Processor (e.g. trainer.make_processor), not by the pipeline.
PROCESSOR_KEYS = frozenset({"min_tiles", "max_tiles", "use_thumbnail", "template"})


@dataclasses.dataclass(frozen=True)
class DataConfig:
  meta: object  # a meta JSON path, or the parsed dict (meta.py documents the format)
  max_tokens: int = 8192  # row length L
  max_tiles_per_row: int = 96  # R: the official num_images_expected; 0 for text-only data
  pack: bool = True  # False: one sample per row, same batch contract
  buffer_size: int = 20  # open rows while packing (official max_buffer_size)
  num_epochs: int | None = None  # None = repeat forever
  shuffle: bool = True
  min_num_frame: int = 8  # frames per training video: randint(min, max) inclusive, as official
  max_num_frame: int = 32
  num_threads: int = 8  # grain prefetch threads running the processor; 0 = in the calling thread
  prefetch: int = 16  # processed samples kept ahead (uint8 tiles)
  max_errors_kept: int = 20
  max_consecutive_skips: int = 1000

  @classmethod
  def from_any(cls, cfg) -> "DataConfig":
    """A DataConfig, a mapping, or an ml_collections ConfigDict; `meta_path` is accepted for `meta`, and the
    processor's settings (PROCESSOR_KEYS), which a run's data section may carry too, are left to it."""
    if isinstance(cfg, cls):
      return cfg
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    if "meta_path" in cfg:
      cfg["meta"] = cfg.pop("meta_path")
    cfg = {k: v for k, v in cfg.items() if k not in PROCESSOR_KEYS}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"unknown data config keys {unknown} (known: {sorted(names)})")
    return cls(**cfg)


class DataIterator:
  """Yields host-local batch dicts (packing.make_batch documents the arrays). get_state() / set_state()
  checkpoint it as a small JSON-serialisable dict; stats() reports samples, skips and packing fill."""

  def __init__(self, cfg, processor, *, batch_size: int, seed: int = 0, process_index: int | None = None,
               process_count: int | None = None, evaluation: bool = False):
    import grain  # noqa: F401  (fail early with the import error, not on the first batch)
    cfg = DataConfig.from_any(cfg)
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if batch_size <= 0 or seed < 0:
      raise ValueError(f"need batch_size > 0 and seed >= 0, got {batch_size}, {seed}")
    if not 1 <= cfg.min_num_frame <= cfg.max_num_frame:
      raise ValueError(f"need 1 <= min_num_frame <= max_num_frame, got {cfg.min_num_frame}, {cfg.max_num_frame}")
    self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
    self.process_index, self.process_count, self.evaluation = process_index, process_count, evaluation
    self._pad_id, self._tile_size = processor.tokenizer.pad_id, processor.tile_size
    self._specs = meta_lib.load_meta(cfg.meta)
    self._sources = [meta_lib.open_source(s) for s in self._specs]
    self._processors = []
    for spec in self._specs:
      p = processor
      if spec.max_dynamic_patch is not None:
        p = copy.copy(processor)  # a shallow copy: it only reads its attributes
        p.max_tiles = spec.max_dynamic_patch
      self._processors.append(p)
    tables = []
    for spec, src in zip(self._specs, self._sources):
      repeat = min(spec.repeat_time, 1.0) if evaluation else spec.repeat_time
      rng = np.random.default_rng([seed, meta_lib.name_seed(spec.name)])
      tables.append(meta_lib.repeat_indices(len(src), repeat, rng))
    self._tables = tables
    self._starts = np.cumsum([0] + [len(t) for t in tables])
    self.epoch_size = int(self._starts[-1])
    if self.epoch_size == 0:
      raise ValueError("the meta's datasets hold no samples")
    self._order = self._build_order()
    self._host_len = len(range(process_index, len(self._order), process_count))
    self._packer = Packer(cfg.max_tokens, cfg.max_tiles_per_row, buffer_size=cfg.buffer_size, pack=cfg.pack)
    self._stream = None
    self._next, self._exhausted, self._consecutive = 0, False, 0
    self._stats = {"samples": 0, "reasons": {}, "rows": 0, "batches": 0, "tokens": 0, "tiles": 0}
    self._errors: list[str] = []

  def _build_order(self):
    import grain
    order = grain.MapDataset.range(self.epoch_size)
    if self.cfg.shuffle and not self.evaluation:
      order = order.shuffle(seed=self.seed % 2**32)
    epochs = 1 if self.evaluation else self.cfg.num_epochs
    return order if epochs == 1 else order.repeat(epochs)

  # ------------------------------------------------------------------------------------ samples

  def _process(self, key: int):
    """Host stream position `key` -> Sample or Skipped; a pure function of (config, seed, key)."""
    position = self.process_index + key * self.process_count
    entry = int(self._order[position])
    d = int(np.searchsorted(self._starts, entry, side="right")) - 1
    source, spec = self._sources[d], self._specs[d]
    record = int(self._tables[d][entry - self._starts[d]])
    where = source.where(record)
    rng = np.random.default_rng([self.seed, position])
    try:
      try:
        rec = source.record(record)
      except ValueError as e:
        raise samples_lib.SampleError("bad_record", str(e)) from None
      out = samples_lib.process_record(
          rec, processor=self._processors[d], root=source.root, rng=rng,
          jpeg_augment=spec.data_augment and not self.evaluation,
          num_frames=(self.cfg.min_num_frame, self.cfg.max_num_frame), max_tokens=self.cfg.max_tokens,
          max_tiles=self.cfg.max_tiles_per_row)
      return samples_lib.to_sample(key, out)
    except samples_lib.SampleError as e:
      return samples_lib.Skipped(key, e.reason, where, str(e))
    except Exception as e:  # noqa: BLE001 - one sample must not stop the run; it is counted and reported
      return samples_lib.Skipped(key, "error", where, f"{type(e).__name__}: {e}")

  def _open_stream(self):
    import grain
    ds = grain.MapDataset.range(self._host_len).map(self._process)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self.cfg.num_threads,
                                                   prefetch_buffer_size=self.cfg.prefetch)))
    if self._next:
      it.set_state({"next_index": self._next})
    return it

  def _skip(self, item: samples_lib.Skipped):
    reasons = self._stats["reasons"]
    reasons[item.reason] = reasons.get(item.reason, 0) + 1
    if len(self._errors) < self.cfg.max_errors_kept:
      message = f"{item.where}: {item.reason}: {item.message}"
      self._errors.append(message)
      log.warning("skipped sample %s", message)
    self._consecutive += 1
    if self._consecutive >= self.cfg.max_consecutive_skips:
      raise RuntimeError(f"{self._consecutive} samples in a row were skipped; is the meta right? first errors: "
                         + "; ".join(self._errors[:5]))

  # ------------------------------------------------------------------------------------ iteration

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while len(self._packer.ready) < self.batch_size and not self._exhausted:
      if self._stream is None:
        self._stream = self._open_stream()
      try:
        item = next(self._stream)
      except StopIteration:
        self._exhausted = True
        self._packer.flush()
        break
      self._next += 1
      if isinstance(item, samples_lib.Skipped):
        self._skip(item)
        continue
      self._consecutive = 0
      self._stats["samples"] += 1
      self._packer.add(item)
    rows = self._packer.take(self.batch_size)
    if not rows:
      raise StopIteration
    s = self._stats
    s["rows"] += len(rows)
    s["batches"] += 1
    s["tokens"] += sum(x.num_tokens for row in rows for x in row)
    s["tiles"] += sum(x.num_tiles for row in rows for x in row)
    return make_batch(rows, batch_size=self.batch_size, max_tokens=self.cfg.max_tokens,
                      max_tiles=self.cfg.max_tiles_per_row, pad_id=self._pad_id, tile_size=self._tile_size)

  def empty_batch(self) -> dict:
    """An all-padding batch (zero loss weight): for a host whose evaluation shard ran out before the others'."""
    return make_batch([], batch_size=self.batch_size, max_tokens=self.cfg.max_tokens,
                      max_tiles=self.cfg.max_tiles_per_row, pad_id=self._pad_id, tile_size=self._tile_size)

  def stats(self) -> dict:
    """samples (packed so far), skipped (total), reasons ({reason: count}), examples (the first
    max_errors_kept skips as 'dataset line N: reason: message'), rows, batches, tokens, tiles, token_fill
    (real tokens / row capacity), position (samples read from this host's stream)."""
    s = copy.deepcopy(self._stats)
    s["skipped"] = sum(s["reasons"].values())
    s["examples"] = list(self._errors)
    s["token_fill"] = s["tokens"] / (s["rows"] * self.cfg.max_tokens) if s["rows"] else 0.0
    s["position"] = self._next
    return s

  # ------------------------------------------------------------------------------------ state

  def _identity(self) -> dict:
    return {"seed": self.seed, "process_index": self.process_index, "process_count": self.process_count,
            "epoch_size": self.epoch_size}

  def get_state(self) -> dict:
    return {"version": 1, **self._identity(), "next": self._next, "exhausted": self._exhausted,
            "consecutive_skips": self._consecutive, "packer": self._packer.state(),
            "stats": copy.deepcopy(self._stats), "errors": list(self._errors)}

  def set_state(self, state: dict) -> None:
    if state.get("version") != 1:
      raise ValueError(f"unknown data iterator state version {state.get('version')!r}")
    mismatch = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
    if mismatch:
      raise ValueError(f"the state was saved by another data setup ((saved, now): {mismatch}); its stream "
                       "positions would not match")
    self._next, self._exhausted = int(state["next"]), bool(state["exhausted"])
    self._consecutive = int(state["consecutive_skips"])
    self._stats, self._errors = copy.deepcopy(state["stats"]), list(state["errors"])

    # A full buffer can hold hundreds of samples: re-process them on as many threads as the stream uses.
    keys = [k for part in ("open", "ready") for row in state["packer"][part] for k in row]
    with concurrent.futures.ThreadPoolExecutor(max(1, self.cfg.num_threads)) as pool:
      items = dict(zip(keys, pool.map(self._process, keys)))
    self._packer.restore(state["packer"], lambda k: items[k] if isinstance(items[k], samples_lib.Sample) else None)
    self.close()  # the stream reopens at self._next on the next batch

  def close(self) -> None:
    """Stop the prefetch threads (the iterator can go on: the stream reopens where it was)."""
    if self._stream is not None:
      self._stream.close()
      self._stream = None


def make_iterator(cfg_data, processor, *, batch_size: int, seed: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> DataIterator:
  """The training iterator: shuffled by `seed`, repeated `num_epochs` times (forever when None), this host's
  shard (process_index / process_count default to JAX's), `batch_size` rows per host-local batch."""
  return DataIterator(cfg_data, processor, batch_size=batch_size, seed=seed, process_index=process_index,
                      process_count=process_count)


def make_eval_iterator(meta, cfg_data, processor, *, batch_size: int, process_index: int | None = None,
                       process_count: int | None = None) -> DataIterator:
  """One pass over held-out data (`meta`: a meta path or dict, in place of cfg_data's) with the training
  data settings: file order, no shuffle, no epochs, no JPEG augmentation, repeat_time above 1 ignored (below
  1 still subsamples, seed 0). The last batch is padded with empty rows. Hosts can run out after different
  numbers of batches; feed `empty_batch()` until all are done (agree on it with e.g.
  `jax.experimental.multihost_utils.process_allgather`)."""
  cfg = dataclasses.replace(DataConfig.from_any(cfg_data), meta=meta)
  return DataIterator(cfg, processor, batch_size=batch_size, seed=0, process_index=process_index,
                      process_count=process_count, evaluation=True)


def load_records(meta, *, limit: int | None = None) -> list[dict]:
  """Held-out questions for generation: {'dataset', 'messages' (the conversation before its last gpt turn,
  placeholders in place), 'images' (paths under root, or encoded bytes / arrays), 'reference' (the last gpt
  turn's text)}. The first records of each dataset, taken in turn, up to `limit`; video samples and records
  without a gpt turn are left out (generation here takes images only)."""
  per_dataset = []
  for spec in meta_lib.load_meta(meta):
    source, found = meta_lib.open_source(spec), []
    for i in range(len(source)):
      if limit is not None and len(found) >= limit:
        break
      try:
        record = source.record(i)
      except ValueError:
        continue
      question = samples_lib.question_of(record, source.root)
      if question is not None:
        found.append({"dataset": spec.name, **question})
    per_dataset.append(found)
  out = [r for group in itertools.zip_longest(*per_dataset) for r in group if r is not None]
  return out if limit is None else out[:limit]
