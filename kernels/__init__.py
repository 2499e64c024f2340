"""Pallas kernels for TPU (Mosaic) and GPU (Triton), each beside a pure-JAX reference.

  flash_attention(q, k, v, *, causal, segment_ids=None, kv_segment_ids=None, sliding_window=None, sinks=None,
                  scale=None, backend='auto', interpret=False, block_sizes=None)   -> kernels/attention/
  gmm(lhs, rhs, group_sizes, *, backend='auto', interpret=False, block_sizes=None,
      preferred_element_type=None)   -> kernels/gmm/ (and tgmm, its weight gradient)

Each kernel is a subpackage: ops.py (the public API, custom_vjp, backend dispatch) imports tpu.py (Mosaic)
and gpu.py (Triton), which import only common.py (the math they share and the reference); platform.py picks
the backend for both.

backend: 'auto' (the kernel of this platform; the reference on the CPU), 'tpu', 'gpu' or 'reference'.
`interpret=True` runs a Pallas kernel on any device (tests). The model chooses between these and XLA in
`internvl_jax/model/backend.py` (called from `model/attention.py` and `model/moe.py`).
"""
from kernels.attention import BlockSizes, flash_attention, reference_attention
from kernels.gmm import GmmBlockSizes, gmm, tgmm

__all__ = ["BlockSizes", "GmmBlockSizes", "flash_attention", "gmm", "reference_attention", "tgmm"]
