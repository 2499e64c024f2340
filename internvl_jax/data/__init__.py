"""Training data: InternVL meta datasets (JSONL or TFDS) -> processor -> packed, host-sharded batches.

  it = make_iterator({"meta": "meta.json", "max_tokens": 8192, "max_tiles_per_row": 96}, processor,
                     batch_size=8, seed=0)
  batch = next(it); state = it.get_state(); it.set_state(state); it.stats()

`packing.make_batch` documents the batch arrays, `meta` the dataset formats, `pipeline` the order of
operations and the state.
"""
from internvl_jax.data.meta import DatasetSpec, load_meta
from internvl_jax.data.packing import Packer, make_batch
from internvl_jax.data.pipeline import DataConfig, DataIterator, load_records, make_eval_iterator, make_iterator
from internvl_jax.data.samples import REASONS

__all__ = ["REASONS", "DataConfig", "DataIterator", "DatasetSpec", "Packer", "load_meta", "load_records",
           "make_batch", "make_eval_iterator", "make_iterator"]
