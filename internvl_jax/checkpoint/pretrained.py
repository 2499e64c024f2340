"""Read and write released checkpoint folders: `from_pretrained` and `save_pretrained`.

Two layouts (REFERENCE.md §7): 'original' (InternVL GitHub / remote code: `vision_model.*`, `mlp1.*`,
`language_model.*`, config with `vision_config` + `llm_config`) and 'hf' (transformers-native
InternVLForConditionalGeneration: `vision_tower.*` / `model.vision_tower.*`, ..., config with
`vision_config` + `text_config`). Loading converts each parameter lazily (views of the memory-mapped
files; see checkpoint_keys.Stacked) and reads only the slices this process's devices hold, so host memory
holds the process's share of the model plus one parameter's share, not the checkpoint nor a whole tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from internvl_jax import sharding
from internvl_jax.checkpoint import mxfp4, safetensors_io
from internvl_jax.checkpoint.keys import FLASH_MODULES, Stacked, canonical_hf_key, skipped_vision_layers, specs
from internvl_jax.config import FlashConfig, InternVLConfig, RopeScaling, TextConfig, VisionConfig
from internvl_jax.model.internvl import InternVL

DEFAULT_IMAGE_TOKEN_ID = 151671  # <IMG_CONTEXT> of the Qwen3-based releases (REFERENCE.md §2.6)
_ARCH = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "GptOssForCausalLM": "gpt_oss"}


# ----------------------------------------------------------------------------------------- config

def _pair(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def text_config_from_dict(c: dict, arch: str, where: str) -> TextConfig:
  if arch not in ("qwen3", "qwen3_moe", "gpt_oss"):
    raise NotImplementedError(f"{where}: decoder {arch!r} is not supported (Qwen3, Qwen3-MoE, GPT-OSS)")
  if c.get("decoder_sparse_step", 1) != 1 or c.get("mlp_only_layers"):
    raise NotImplementedError(f"{where}: decoder_sparse_step / mlp_only_layers (dense layers inside an MoE) unsupported")
  if c.get("attention_bias") and arch != "gpt_oss":
    raise NotImplementedError(f"{where}: attention_bias=true is not supported for {arch}")
  if c.get("use_sliding_window") and arch != "gpt_oss":
    raise NotImplementedError(f"{where}: use_sliding_window=true is not supported for {arch}")
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", None) and (arch != "gpt_oss" or rope_type != "yarn"):
    raise NotImplementedError(f"{where}: rope type {rope_type!r} is not supported for {arch}")
  heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
  gpt_oss = {}
  if arch == "gpt_oss":
    if rope_type == "yarn":
      # transformers' yarn default for an absent `truncate` is true; gpt-oss-20b writes false
      gpt_oss["rope_scaling"] = RopeScaling(
          factor=float(rope["factor"]), beta_fast=float(rope.get("beta_fast") or 32),
          beta_slow=float(rope.get("beta_slow") or 1),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
          truncate=bool(rope.get("truncate", True)), attention_factor=rope.get("attention_factor"))
    # transformers' GptOssConfig default: sliding window on even layer indices
    types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    gpt_oss.update(layer_types=tuple(types), swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
                   swiglu_limit=float(c.get("swiglu_limit", 7.0)))
  return TextConfig(
      arch=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=layers,
      num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
      head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate_size=c.get("intermediate_size", 0),
      rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 1e6))),
      attention_bias=c.get("attention_bias", False), num_experts=c.get("num_experts", c.get("num_local_experts", 0)) or 0,
      num_experts_per_tok=c.get("num_experts_per_tok", 0) or 0,
      moe_intermediate_size=c.get("moe_intermediate_size", c.get("intermediate_size", 0) if arch == "gpt_oss" else 0) or 0,
      norm_topk_prob=c.get("norm_topk_prob", False), router_aux_loss_coef=c.get("router_aux_loss_coef", 0.001),
      sliding_window=c.get("sliding_window") or 0, tie_word_embeddings=c.get("tie_word_embeddings", False),
      max_position_embeddings=c.get("max_position_embeddings", 40960), **gpt_oss)


def _image_token_from_tokenizer(folder: str) -> int | None:
  tc = os.path.join(folder, "tokenizer_config.json")
  if os.path.exists(tc):
    with open(tc) as f:
      for i, tok in json.load(f).get("added_tokens_decoder", {}).items():
        if tok.get("content") == "<IMG_CONTEXT>":
          return int(i)
  tj = os.path.join(folder, "tokenizer.json")
  if os.path.exists(tj):
    with open(tj) as f:
      for tok in json.load(f).get("added_tokens", []):
        if tok.get("content") == "<IMG_CONTEXT>":
          return int(tok["id"])
  return None


def flash_config_from_dict(c: dict, layout: str, where: str, flash_weights: bool = False) -> FlashConfig | None:
  """The ViR settings of a Flash checkpoint (config keys flash_mode, flash_relative_threshold,
  flash_absolute_threshold, and our flash_rule / flash_pooling), or None for a plain one. A checkpoint is a
  Flash one when its weights hold the router, or its config says flash_mode true or model_type internvl_flash
  (not is_flash_model false): a plain config may carry flash_mode false. flash_mode defaults to False in the
  original layout (the remote code's getattr default) and True in transformers' internvl_flash (which always
  routes). Absent thresholds keep FlashConfig's defaults, with a warning: the released values are unknown."""
  flagged = c.get("flash_mode") is True or (c.get("model_type") == "internvl_flash" and c.get("is_flash_model", True))
  if not (flagged or flash_weights):
    return None
  d = FlashConfig()
  absent = [k for k in ("flash_relative_threshold", "flash_absolute_threshold") if c.get(k) is None]
  if absent:
    warnings.warn(f"{where}: {' and '.join(absent)} absent; using relative {d.relative_threshold}, absolute "
                  f"{d.absolute_threshold} (transformers' internvl_flash test values; the released ones are unknown)")
  rel, absolute = c.get("flash_relative_threshold"), c.get("flash_absolute_threshold")
  return FlashConfig(mode=bool(c.get("flash_mode", layout == "hf")),
                     relative_threshold=d.relative_threshold if rel is None else float(rel),
                     absolute_threshold=d.absolute_threshold if absolute is None else float(absolute),
                     rule=c.get("flash_rule", d.rule), pooling=c.get("flash_pooling", d.pooling))


def flash_dict(f: FlashConfig) -> dict:
  return dict(flash_mode=f.mode, flash_relative_threshold=f.relative_threshold,
              flash_absolute_threshold=f.absolute_threshold, flash_rule=f.rule, flash_pooling=f.pooling)


def config_from_dict(c: dict, folder: str = "<config>", *, flash_weights: bool = False) -> tuple[InternVLConfig, str]:
  """InternVLConfig and layout ('original' or 'hf') from a released config.json (flash_weights: the
  checkpoint holds the ViR router, so the model is a Flash one whatever the config says)."""
  where = os.path.join(folder, "config.json")
  try:
    cfg, layout = _config_from_dict(c, folder, where)
  except KeyError as e:
    raise ValueError(f"{where}: required field {e} is missing") from None
  cfg = cfg.replace(flash=flash_config_from_dict(c, layout, where, flash_weights))
  acts = {"vision_config.hidden_act": c["vision_config"].get("hidden_act", "gelu"),
          "projector_hidden_act": c.get("projector_hidden_act", "gelu"),
          "text hidden_act": c.get("llm_config", c.get("text_config", {})).get("hidden_act", "silu")}
  for field, act in acts.items():
    if act != ("silu" if field.startswith("text") else "gelu"):
      raise NotImplementedError(f"{where}: {field}={act!r} is not supported")
  return cfg, layout


def _config_from_dict(c: dict, folder: str, where: str) -> tuple[InternVLConfig, str]:
  if "llm_config" in c:
    layout, v, llm = "original", c["vision_config"], c["llm_config"]
    if c.get("ps_version", "v2") != "v2":
      raise NotImplementedError(f"{where}: ps_version={c['ps_version']!r}; only 'v2' pixel shuffle is supported")
    arch = _ARCH.get((llm.get("architectures") or [""])[0])
    if arch is None:
      raise NotImplementedError(f"{where}: llm_config.architectures={llm.get('architectures')} is not supported")
    vision = VisionConfig(
        hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], image_size=c.get("force_image_size") or _pair(v["image_size"]),
        patch_size=_pair(v["patch_size"]), norm_type=v.get("norm_type", "rms_norm"),
        norm_eps=v.get("layer_norm_eps", 1e-6), qk_norm=v.get("qk_normalization", True),
        qkv_bias=v.get("qkv_bias", False), layer_scale_init=v.get("initializer_factor", 0.1),
        drop_path_rate=v.get("drop_path_rate", 0.0), select_layer=c.get("select_layer", -1))
    text = text_config_from_dict(llm, arch, where + ":llm_config")
    token = c.get("img_context_token_id") or _image_token_from_tokenizer(folder) or DEFAULT_IMAGE_TOKEN_ID
  elif "text_config" in c:
    layout, v, tc = "hf", c["vision_config"], c["text_config"]
    if c.get("vision_feature_select_strategy", "default") != "default":
      raise NotImplementedError(f"{where}: vision_feature_select_strategy must be 'default'")
    if not isinstance(c.get("vision_feature_layer", -1), int):
      raise NotImplementedError(f"{where}: a list vision_feature_layer is not supported")
    vision = VisionConfig(
        hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], image_size=_pair(v.get("image_size", 448)),
        patch_size=_pair(v.get("patch_size", 14)), norm_type=v.get("norm_type", "layer_norm"),
        norm_eps=v.get("layer_norm_eps", 1e-6), qk_norm=v.get("use_qk_norm", False),
        qkv_bias=v.get("attention_bias", False), layer_scale_init=v.get("layer_scale_init_value", 0.1),
        drop_path_rate=v.get("drop_path_rate", 0.0), select_layer=c.get("vision_feature_layer", -1))
    text = text_config_from_dict(tc, tc.get("model_type", "qwen3"), where + ":text_config")
    # transformers ties lm_head by the top-level flag (InternVLConfig default: True).
    text = text.__class__(**{**text.__dict__, "tie_word_embeddings": c.get("tie_word_embeddings", True)})
    token = c.get("image_token_id", 151667)  # transformers' InternVLConfig default when the key is absent
  else:
    raise ValueError(f"{where}: neither 'llm_config' (original layout) nor 'text_config' (transformers layout)")
  return InternVLConfig(vision=vision, text=text, downsample_ratio=c.get("downsample_ratio", 0.5),
                        image_token_id=int(token)), layout


def _text_dict(t: TextConfig) -> dict:
  d = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
           num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
           intermediate_size=t.intermediate_size, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
           rope_theta=t.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
           attention_bias=t.attention_bias, tie_word_embeddings=t.tie_word_embeddings,
           max_position_embeddings=t.max_position_embeddings)
  if t.arch == "gpt_oss":
    r = t.rope_scaling
    if r is not None:
      yarn = dict(rope_type="yarn", factor=r.factor, beta_fast=r.beta_fast, beta_slow=r.beta_slow,
                  original_max_position_embeddings=r.original_max_position_embeddings, truncate=r.truncate,
                  **({} if r.attention_factor is None else {"attention_factor": r.attention_factor}))
      # rope_parameters (transformers 5) and rope_scaling (the 4.55 configs the release was trained with)
      d.update(rope_parameters={**yarn, "rope_theta": t.rope_theta}, rope_scaling=yarn)
    d.update(num_local_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
             intermediate_size=t.moe_intermediate_size, router_aux_loss_coef=t.router_aux_loss_coef,
             sliding_window=t.sliding_window, layer_types=list(t.layer_types), swiglu_alpha=t.swiglu_alpha,
             swiglu_limit=t.swiglu_limit)
  elif t.is_moe:
    d.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
             moe_intermediate_size=t.moe_intermediate_size, norm_topk_prob=t.norm_topk_prob,
             router_aux_loss_coef=t.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[])
  return d


def config_to_dict(cfg: InternVLConfig, layout: str) -> dict:
  v, t = cfg.vision, cfg.text
  flash = {} if cfg.flash is None else flash_dict(cfg.flash)
  if layout == "hf":
    hf = dict(
        architectures=["InternVLForConditionalGeneration"], model_type="internvl", image_token_id=cfg.image_token_id,
        image_seq_length=cfg.tokens_per_tile, downsample_ratio=cfg.downsample_ratio, projector_hidden_act="gelu",
        vision_feature_layer=v.select_layer, vision_feature_select_strategy="default",
        tie_word_embeddings=t.tie_word_embeddings,
        vision_config=dict(model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                           image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2, norm_type=v.norm_type,
                           layer_norm_eps=v.norm_eps, use_qk_norm=v.qk_norm, attention_bias=v.qkv_bias,
                           layer_scale_init_value=v.layer_scale_init, hidden_act="gelu", use_mean_pooling=True,
                           use_absolute_position_embeddings=True, drop_path_rate=v.drop_path_rate),
        text_config=dict(model_type=t.arch, **_text_dict(t)))
    if flash:  # transformers' internvl_flash (model_type and class of its port)
      hf.update(architectures=["InternvlFlashForConditionalGeneration"], model_type="internvl_flash", **flash)
      hf["vision_config"]["model_type"] = "internvl_flash_vision"
    return hf
  return dict(
      architectures=["InternVLChatModel"], model_type="internvl_chat", downsample_ratio=cfg.downsample_ratio,
      force_image_size=v.image_size, select_layer=v.select_layer, ps_version="v2",
      template="internvl3_5_gpt_oss" if t.arch == "gpt_oss" else "internvl2_5",
      dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
      img_context_token_id=cfg.image_token_id, tie_word_embeddings=t.tie_word_embeddings,
      vision_config=dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.hidden_size,
                         num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                         intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
                         norm_type=v.norm_type, layer_norm_eps=v.norm_eps, qk_normalization=v.qk_norm,
                         qkv_bias=v.qkv_bias, initializer_factor=v.layer_scale_init,
                         drop_path_rate=v.drop_path_rate, hidden_act="gelu", use_flash_attn=False),
      llm_config=dict(architectures=[{v: k for k, v in _ARCH.items()}[t.arch]], model_type=t.arch, **_text_dict(t)),
      **flash)


def load_config(path: str, *, flash_weights: bool = False) -> tuple[InternVLConfig, str]:
  where = os.path.join(path, "config.json")
  if not os.path.exists(where):
    raise FileNotFoundError(f"{where} not found: a checkpoint folder holds config.json and *.safetensors")
  with open(where) as f:
    return config_from_dict(json.load(f), path, flash_weights=flash_weights)


# ----------------------------------------------------------------------------------------- load

def _np_dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


def tensor_sources(ckpt: safetensors_io.Checkpoint, layout: str, arch: str = "qwen3") -> dict[str, np.ndarray]:
  """canonical key -> the tensor as a lazy view of the checkpoint (nothing is read). transformers' fused
  in-memory Qwen3-MoE experts (`mlp.experts.gate_up_proj` [E, 2I, d], `mlp.experts.down_proj` [E, d, I])
  appear as the per-expert tensors that released checkpoints hold, each a slice of the fused view. GPT-OSS
  keeps its fused experts; those stored as MXFP4 (`X_blocks` + `X_scales`) appear as X, dequantized when
  read (`mxfp4.Packed`)."""
  out = {}
  packed = mxfp4.pairs(ckpt.keys()) if arch == "gpt_oss" else {}
  for base, (blocks, scales) in packed.items():
    out[canonical_hf_key(base) if layout == "hf" else base] = mxfp4.Packed(ckpt.view(blocks), ckpt.view(scales))
  for key in ckpt.keys():
    if packed and mxfp4.is_mxfp4_key(key):
      continue
    name, view = (canonical_hf_key(key) if layout == "hf" else key), ckpt.view(key)
    if arch != "gpt_oss" and name.endswith("mlp.experts.gate_up_proj") and view.ndim == 3:
      half = view.shape[1] // 2
      for x in range(view.shape[0]):
        out[f"{name[:-len('gate_up_proj')]}{x}.gate_proj.weight"] = view[x, :half]
        out[f"{name[:-len('gate_up_proj')]}{x}.up_proj.weight"] = view[x, half:]
    elif arch != "gpt_oss" and name.endswith("mlp.experts.down_proj") and view.ndim == 3:
      for x in range(view.shape[0]):
        out[f"{name[:-len('down_proj')]}{x}.down_proj.weight"] = view[x]
    else:
      out[name] = view
  return out


def _file_order(lazy) -> list[int]:
  """lazy's axes from slowest- to fastest-varying in the file."""
  if isinstance(lazy, mxfp4.Packed):
    return list(range(lazy.ndim))
  if isinstance(lazy, Stacked):
    inner = _file_order(lazy.parts[0])
    return [lazy.axis] + [a + (a >= lazy.axis) for a in inner]
  return sorted(range(lazy.ndim), key=lambda a: -abs(lazy.strides[a]))


def read(ckpt: safetensors_io.Checkpoint, lazy, dtype) -> np.ndarray:
  """A lazy parameter (view or `Stacked` of views) as an array of `dtype`, reading only what it spans.

  The array keeps the file's memory order (a transposed view when the conversion transposes): copying
  out of the read buffer then walks both sides sequentially, and the transpose is left to device_put,
  whose blocked transpose is far faster than numpy's strided copy."""
  order = _file_order(lazy)
  out = np.empty([lazy.shape[a] for a in order], dtype).transpose(np.argsort(order))
  _fill(ckpt, lazy, out)
  return out


def _fill(ckpt: safetensors_io.Checkpoint, lazy, out: np.ndarray) -> None:
  if isinstance(lazy, Stacked):
    for j, part in enumerate(lazy.parts):
      _fill(ckpt, part, out[(slice(None),) * lazy.axis + (j,)])
  elif isinstance(lazy, mxfp4.Packed):
    out[...] = lazy.dequantize(lambda view: read(ckpt, view, view.dtype))
  else:
    ckpt.read_into(lazy, out)


def _equal(ckpt: safetensors_io.Checkpoint, a: np.ndarray, b: np.ndarray) -> bool:
  """Value equality of two checkpoint tensors, read a block of rows at a time."""
  if a.shape != b.shape:
    return False
  rows = max(1, safetensors_io.READ_CHUNK // max(1, a[:1].nbytes))
  return all(np.array_equal(read(ckpt, a[r:r + rows], a.dtype), read(ckpt, b[r:r + rows], b.dtype))
             for r in range(0, a.shape[0], rows))


def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """(start, stop) per dimension of a shard index (slices are not hashable before Python 3.12)."""
  index = index + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def place(ckpt: safetensors_io.Checkpoint, lazy, dtype, target: jax.sharding.Sharding) -> jax.Array:
  """The parameter as a global array with `target` sharding, reading only this process's shards.

  The box spanning this process's shards is read once and each local device's shard is cut from it (with
  several devices per host, per-device reads would read a strided span such as a column block once per
  device). Shards that do not tile their box (an unusual device order) are read one by one instead."""
  shape = tuple(lazy.shape)
  owned = {_bounds(i, shape) for i in target.addressable_devices_indices_map(shape).values()}
  if not owned:  # a mesh without this process's devices: nothing to read (the value is never placed)
    return jax.make_array_from_callback(shape, target, lambda i: np.zeros(0, dtype), dtype=dtype)
  box = tuple((min(i[d][0] for i in owned), max(i[d][1] for i in owned)) for d in range(len(shape)))
  volume = lambda bounds: math.prod(stop - start for start, stop in bounds)
  if volume(box) == sum(map(volume, owned)):
    block = read(ckpt, lazy[tuple(slice(*b) for b in box)], dtype)
    cut = lambda i: tuple(slice(a - b, z - b) for (a, z), (b, _) in zip(_bounds(i, shape), box))
    return jax.make_array_from_callback(shape, target, lambda i: block[cut(i)], dtype=dtype)
  return jax.make_array_from_callback(
      shape, target, lambda i: read(ckpt, lazy[tuple(slice(*b) for b in _bounds(i, shape))], dtype), dtype=dtype)


_FLASH_PREFIXES = {"original": FLASH_MODULES, "hf": tuple("model." + m for m in FLASH_MODULES)}


def is_flash_checkpoint(path: str) -> bool:
  """Whether a checkpoint folder is a Flash one (its config says so or its weights hold the router), as
  `from_pretrained` decides."""
  cfg, layout = load_config(path)
  if cfg.flash is not None:
    return True
  sources = tensor_sources(safetensors_io.Checkpoint(path), layout, cfg.text.arch)
  return any(k.startswith(_FLASH_PREFIXES[layout]) for k in sources)


def from_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None, mesh=None,
                    image_token_id: int | None = None, part: str = "all", **config_overrides) -> InternVL:
  """Load a released checkpoint folder (either layout, detected from config.json).

  dtype: compute dtype (and weight dtype unless `param_dtype` is given). mesh: place each tensor with its
  sharding from the logical-axis rules; each process reads only the slices its own devices hold.
  `config_overrides` replace InternVLConfig fields (e.g. remat); `flash={...}` replaces FlashConfig fields
  of a Flash checkpoint (thresholds, rule, pooling, mode). Missing, unexpected and mis-shaped
  tensors are reported together in one error. As in transformers, a config that ties lm_head to the
  embeddings while the checkpoint holds a different lm_head loads untied (with a warning). part: 'vision' or
  'language' (DvD, `InternVL`) reads only that part's tensors; the other part's may be absent.
  """
  cfg, layout = load_config(path)
  ckpt = safetensors_io.Checkpoint(path)
  sources = tensor_sources(ckpt, layout, cfg.text.arch)
  if cfg.flash is None and any(k.startswith(_FLASH_PREFIXES[layout]) for k in sources):
    cfg, layout = load_config(path, flash_weights=True)
  flash = config_overrides.pop("flash", {})
  if isinstance(flash, dict):
    if flash and cfg.flash is None:
      raise ValueError(f"{path}: flash={flash} given, but the checkpoint is not a Flash one (no ViR router)")
    flash = dataclasses.replace(cfg.flash, **flash) if flash else cfg.flash
  elif flash is not None and not isinstance(flash, FlashConfig):
    raise TypeError(f"flash= takes a dict of FlashConfig fields (or a FlashConfig), got {flash!r}")
  if flash is None and cfg.flash is not None:
    raise ValueError(f"{path}: a Flash checkpoint; flash=None would leave its router weights unread")
  cfg = cfg.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype or dtype).name, flash=flash,
                    **config_overrides)
  if image_token_id is not None:
    cfg = cfg.replace(image_token_id=image_token_id)
  head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
  if part != "vision" and cfg.text.tie_word_embeddings and head in sources and embed in sources:
    if not _equal(ckpt, sources[head], sources[embed]):
      warnings.warn(f"{path}: tie_word_embeddings is true but {head} differs from the embeddings; loading it "
                    "untied, as transformers does")
      cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
  everything = specs(cfg, layout)
  abstract = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0), part=part))
  graphdef, abs_state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(abs_state))
  table = {p: spec for p, spec in everything.items() if p in flat}
  wanted = {k: s for spec in table.values() for k, s in zip(spec.keys, spec.shapes)}
  others = {k for spec in everything.values() for k in spec.keys} - set(wanted)  # the other part's: not read
  skip = skipped_vision_layers(cfg, layout)
  missing = sorted(set(wanted) - set(sources))
  unexpected = sorted(k for k in set(sources) - set(wanted) - others
                      if not k.startswith(skip or ("\0",)) and not (cfg.text.tie_word_embeddings and k == head))
  mismatched = [f"{k}: checkpoint {sources[k].shape}, expected {s}" for k, s in sorted(wanted.items())
                if k in sources and tuple(sources[k].shape) != tuple(s)]
  if missing or unexpected or mismatched:
    parts = [f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
             for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("shape mismatches", mismatched)) if items]
    raise ValueError(f"{path} ({layout} layout) does not match the model config:\n  " + "\n  ".join(parts))

  if set(flat) != set(table):
    raise AssertionError(f"key table out of sync with the model: {sorted(set(flat) ^ set(table))[:10]}")
  target = _np_dtype(cfg.param_dtype)
  for p, var in flat.items():
    spec = table[p]
    lazy = spec.load([sources[k] for k in spec.keys])
    if tuple(lazy.shape) != var.get_value().shape:
      raise AssertionError(f"{'.'.join(map(str, p))}: converted to {lazy.shape}, model wants {var.get_value().shape}")
    if mesh is None:
      var.set_value(jnp.asarray(read(ckpt, lazy, target)))
    else:
      var.set_value(place(ckpt, lazy, target, sharding.variable_sharding(var, mesh)))
  return nnx.merge(graphdef, abs_state)


# ----------------------------------------------------------------------------------------- save

def save_pretrained(model: InternVL, path: str, *, layout: str = "hf", dtype: Any = None,
                    max_shard_size: int = 5 * 2**30) -> None:
  """Write config.json and safetensors (sharded with an index above `max_shard_size` bytes).

  layout 'hf' is read by transformers' InternVLForConditionalGeneration; 'original' has the key names
  and config of the released InternVL checkpoints (the remote-code .py files are not written); both are
  read by `from_pretrained`. Tensors are fetched and written one at a time; stale safetensors files of
  an earlier export in the same folder are removed first.
  """
  cfg = model.cfg
  table = specs(cfg, layout)
  os.makedirs(path, exist_ok=True)
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out_dtype = _np_dtype(dtype or cfg.param_dtype)

  if jax.process_count() > 1:
    raise NotImplementedError("save_pretrained gathers through one process; multi-host export lands with "
                              "sharded checkpointing (orbax)")

  def fetch(p):
    return np.asarray(jax.device_get(state[p].get_value())).astype(out_dtype)

  entries = []
  for p, spec in table.items():
    cache = {}

    def make(i, p=p, spec=spec, cache=cache):
      if "t" not in cache:
        cache["t"] = spec.save(fetch(p))
      out = cache["t"][i]
      if i == len(spec.keys) - 1:
        cache.clear()
      return out

    entries += [(k, s, out_dtype, (lambda i=i, make=make: make(i))) for i, (k, s) in enumerate(zip(spec.keys, spec.shapes))]
  safetensors_io.write(path, entries, max_shard_size)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_dict(cfg, layout), f, indent=2)
