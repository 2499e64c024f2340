"""Pallas kernels (flash attention, grouped matmul) for TPU (Mosaic) and GPU (Triton).

Not written yet: the model runs its XLA paths (`internvl_jax.layers.attention`,
`internvl_jax.moe.grouped_matmul`), which are the signatures these kernels will implement.
"""
