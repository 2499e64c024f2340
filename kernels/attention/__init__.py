"""Flash attention: `flash_attention` and its pieces. ops.py is the public API (custom_vjp, backend dispatch),
tpu.py the Pallas Mosaic kernels, gpu.py the Pallas Triton kernels, common.py the block math they share and
the pure-JAX reference; imports run ops -> tpu / gpu -> common, never upward."""
from kernels.attention.common import BlockSizes, dense_mask, reference_attention
from kernels.attention.ops import flash_attention

__all__ = ["BlockSizes", "dense_mask", "flash_attention", "reference_attention"]
