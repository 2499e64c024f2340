"""internvl-jax: InternVL3.5 in JAX / Flax NNX."""
from internvl_jax.config import InternVLConfig, TextConfig, VisionConfig
from internvl_jax.internvl import InternVL, forward, init_model

__all__ = ["InternVL", "InternVLConfig", "TextConfig", "VisionConfig", "forward", "init_model"]
from internvl_jax.checkpoint import from_pretrained, save_pretrained  # noqa: E402

__all__ += ["from_pretrained", "save_pretrained"]
