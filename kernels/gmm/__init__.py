"""Grouped matmul: `gmm` and `tgmm`, its weight gradient. ops.py is the public API (jitted wrappers,
custom_vjp, backend dispatch), tpu.py the Pallas Mosaic kernels, gpu.py the Pallas Triton kernels, common.py
what they share (tiles, visit list); imports run ops -> tpu / gpu -> common, never upward."""
from kernels.gmm.common import GmmBlockSizes
from kernels.gmm.ops import gmm, tgmm

__all__ = ["GmmBlockSizes", "gmm", "tgmm"]
