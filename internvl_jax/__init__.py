"""internvl-jax: InternVL3.5 in JAX / Flax NNX."""
from internvl_jax.checkpoint.pretrained import from_pretrained, save_pretrained
from internvl_jax.config import InternVLConfig, TextConfig, VisionConfig
from internvl_jax.inputs.dynamic_resolution import dynamic_preprocess, tile_grid
from internvl_jax.model.internvl import InternVL, forward, init_model
from internvl_jax.inference.chat import chat
from internvl_jax.inference.engine import generate
from internvl_jax.inputs.processor import Processor, pad_batch
from internvl_jax.inputs.tokenizer import Tokenizer

__all__ = ["InternVL", "InternVLConfig", "Processor", "TextConfig", "Tokenizer", "VisionConfig", "dynamic_preprocess",
           "chat", "forward", "from_pretrained", "generate", "init_model", "pad_batch", "save_pretrained", "tile_grid"]
