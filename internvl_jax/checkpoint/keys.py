"""Where each of our parameters lives in the two released checkpoint layouts (REFERENCE.md §7).

`specs(cfg, layout)` maps every parameter path of `InternVL` to a `Spec`: the checkpoint tensor names,
their expected shapes, and the two conversions between PyTorch's layout ([out, in] linears, OIHW convs,
fused or split qkv, per-expert tensors) and ours ([in, out] with heads split out, HWIO patches, experts
stacked). Key names are the canonical ones: the original InternVL names, or for 'hf' the names that
transformers' `save_pretrained` writes (`vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`); `canonical_hf_key` folds the in-memory
spelling (`model.vision_tower.*`, `lm_head.weight`, ...) onto them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from internvl_jax.config import InternVLConfig
from internvl_jax.model import vir

Path = tuple


@dataclasses.dataclass(frozen=True)
class Spec:
  keys: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]  # checkpoint shapes, one per key
  # checkpoint tensors -> our array: given views of memory-mapped tensors, a view or a `Stacked` of views
  # (so a loader can read one shard of it), never a copy
  load: Callable[[list[np.ndarray]], np.ndarray | Stacked]
  save: Callable[[np.ndarray], list[np.ndarray]]  # our array -> checkpoint tensors


class Stacked:
  """`np.stack(parts, axis)` kept lazy: indexing picks the parts and indexes each one, so parts that are
  views of memory-mapped checkpoint tensors stay views and a shard of the result reads only its slices.
  `np.asarray` stacks (and reads) everything."""

  def __init__(self, parts, axis: int, shape: tuple[int, ...] | None = None, dtype=None):
    self.parts, self.axis = list(parts), axis
    self.dtype = dtype or self.parts[0].dtype
    self.shape = shape or self.parts[0].shape[:axis] + (len(self.parts),) + self.parts[0].shape[axis:]
    self.ndim = len(self.shape)

  def __getitem__(self, index) -> "Stacked":
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > self.ndim or not all(isinstance(i, slice) for i in index):
      raise TypeError(f"Stacked takes a tuple of up to {self.ndim} slices, got {index!r}")
    index += (slice(None),) * (self.ndim - len(index))
    rest = index[:self.axis] + index[self.axis + 1:]
    shape = tuple(len(range(*i.indices(n))) for i, n in zip(index, self.shape))
    return Stacked([p[rest] for p in self.parts[index[self.axis]]], self.axis, shape, self.dtype)

  def __array__(self, dtype=None, copy=None):
    return np.stack([np.asarray(p) for p in self.parts], self.axis).astype(dtype or self.dtype, copy=False)


def plain(key, ckpt_shape, ours):
  return Spec((key,), (tuple(ckpt_shape),), lambda a: a[0].reshape(ours), lambda x: [x.reshape(ckpt_shape)])


def linear(key, ours, n_in):
  """torch Linear weight [out, in] <-> ours [*in_dims, *out_dims] (first n_in dims are inputs)."""
  fan_in, fan_out = math.prod(ours[:n_in]), math.prod(ours[n_in:])
  return Spec((key,), ((fan_out, fan_in),), lambda a: a[0].T.reshape(ours), lambda x: [x.reshape(fan_in, fan_out).T])


def split_linear(keys, ours):
  """q/k/v linears [D, D] each <-> ours [D, 3, heads, head_dim] (the original fused qkv order)."""
  d = ours[0]
  return Spec(tuple(keys), ((d, d),) * 3, lambda a: Stacked([w.T.reshape(d, *ours[2:]) for w in a], 1),
              lambda x: [x[:, s].reshape(d, d).T for s in range(3)])


def split_bias(keys, ours):
  d = math.prod(ours[1:])
  return Spec(tuple(keys), ((d,),) * 3, lambda a: Stacked([b.reshape(ours[1:]) for b in a], 0),
              lambda x: [x[s].reshape(d) for s in range(3)])


def stacked_linear(keys, ours):
  """per-expert torch Linear weights [out, in] <-> ours [experts, in, out]."""
  _, fan_in, fan_out = ours
  return Spec(tuple(keys), ((fan_out, fan_in),) * len(keys), lambda a: Stacked([w.T for w in a], 0),
              lambda x: [w.T for w in x])


def conv(key, ours):
  """Conv2d weight [D, 3, p, p] (OIHW) <-> ours [p, p, 3, D]."""
  p, _, c, d = ours
  return Spec((key,), ((d, c, p, p),), lambda a: a[0].transpose(2, 3, 1, 0), lambda x: [x.transpose(3, 2, 0, 1)])


FLASH_MODULES = ("mlp2.", "pooling_before_gating.", "gating.")


def canonical_hf_key(key: str) -> str:
  """The spelling `specs(..., 'hf')` uses: transformers' saved names for the base model; for the Flash modules,
  the `model.`-prefixed names that the internvl_flash converter writes (a bare `mlp2.*` is folded onto them)."""
  if key.startswith(FLASH_MODULES):
    return "model." + key
  for mem, saved in (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model.model.")):
    if key.startswith(mem):
      return saved + key[len(mem):]
  return "language_model.lm_head.weight" if key == "lm_head.weight" else key


def _vision(cfg: InternVLConfig, layout: str, n_layers: int) -> dict[Path, Spec]:
  v = cfg.vision
  d, n, h, i, p = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, v.patch_size
  out: dict[Path, Spec] = {}
  hf = layout == "hf"
  pre = "vision_tower." if hf else "vision_model."
  emb = pre + "embeddings."
  out[("vision_model", "class_embedding")] = plain(emb + ("cls_token" if hf else "class_embedding"), (1, 1, d), (d,))
  patch = emb + ("patch_embeddings.projection." if hf else "patch_embedding.")
  out[("vision_model", "patch_embed")] = conv(patch + "weight", (p, p, 3, d))
  out[("vision_model", "patch_bias")] = plain(patch + "bias", (d,), (d,))
  npos = 1 + v.grid ** 2
  out[("vision_model", "position_embedding")] = plain(emb + ("position_embeddings" if hf else "position_embedding"),
                                                      (1, npos, d), (npos, d))
  names = (dict(layer="encoder.layer.", attn="attention.", proj="projection_layer", norm1="layernorm_before",
                norm2="layernorm_after", ls1="lambda_1", ls2="lambda_2") if hf else
           dict(layer="encoder.layers.", attn="attn.", proj="proj", norm1="norm1", norm2="norm2", ls1="ls1", ls2="ls2"))
  for li in range(n_layers):
    k = pre + names["layer"] + f"{li}."
    a = k + names["attn"]
    our = ("vision_model", "layers", li)
    for norm in ("norm1", "norm2"):
      out[our + (norm, "weight")] = plain(k + names[norm] + ".weight", (d,), (d,))
      if v.norm_type == "layer_norm":
        out[our + (norm, "bias")] = plain(k + names[norm] + ".bias", (d,), (d,))
    if hf:
      out[our + ("attn", "qkv")] = split_linear([a + f"{s}_proj.weight" for s in "qkv"], (d, 3, n, h))
      if v.qkv_bias:
        out[our + ("attn", "qkv_bias")] = split_bias([a + f"{s}_proj.bias" for s in "qkv"], (3, n, h))
    else:
      out[our + ("attn", "qkv")] = linear(a + "qkv.weight", (d, 3, n, h), 1)
      if v.qkv_bias:
        out[our + ("attn", "qkv_bias")] = plain(a + "qkv.bias", (3 * d,), (3, n, h))
    if v.qk_norm:
      for s in "qk":
        out[our + ("attn", f"{s}_norm", "weight")] = plain(a + f"{s}_norm.weight", (d,), (d,))
    out[our + ("attn", "proj")] = linear(a + names["proj"] + ".weight", (n, h, d), 2)
    out[our + ("attn", "proj_bias")] = plain(a + names["proj"] + ".bias", (d,), (d,))
    out[our + ("ls1",)] = plain(k + names["ls1"], (d,), (d,))
    out[our + ("ls2",)] = plain(k + names["ls2"], (d,), (d,))
    out[our + ("fc1",)] = linear(k + "mlp.fc1.weight", (d, i), 1)
    out[our + ("fc1_bias",)] = plain(k + "mlp.fc1.bias", (i,), (i,))
    out[our + ("fc2",)] = linear(k + "mlp.fc2.weight", (i, d), 1)
    out[our + ("fc2_bias",)] = plain(k + "mlp.fc2.bias", (d,), (d,))
  return out


def _projector(cfg: InternVLConfig, layout: str) -> dict[Path, Spec]:
  c = cfg.vision.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
  dl = cfg.text.hidden_size
  if layout == "hf":
    norm, l1, l2 = (f"multi_modal_projector.{s}." for s in ("layer_norm", "linear_1", "linear_2"))
  else:
    norm, l1, l2 = "mlp1.0.", "mlp1.1.", "mlp1.3."
  return {
      ("mlp1", "norm", "weight"): plain(norm + "weight", (c,), (c,)),
      ("mlp1", "norm", "bias"): plain(norm + "bias", (c,), (c,)),
      ("mlp1", "linear_1"): linear(l1 + "weight", (c, dl), 1),
      ("mlp1", "bias_1"): plain(l1 + "bias", (dl,), (dl,)),
      ("mlp1", "linear_2"): linear(l2 + "weight", (dl, dl), 1),
      ("mlp1", "bias_2"): plain(l2 + "bias", (dl,), (dl,)),
  }


def _language(cfg: InternVLConfig) -> dict[Path, Spec]:
  t = cfg.text
  d, n, kv, h, v = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.vocab_size
  pre = "language_model.model."
  out: dict[Path, Spec] = {("language_model", "embed_tokens"): plain(pre + "embed_tokens.weight", (v, d), (v, d)),
                           ("language_model", "norm", "weight"): plain(pre + "norm.weight", (d,), (d,))}
  if not t.tie_word_embeddings:
    out[("language_model", "lm_head")] = linear("language_model.lm_head.weight", (d, v), 1)
  for li in range(t.num_layers):
    k = pre + f"layers.{li}."
    our = ("language_model", "layers", li)
    out[our + ("input_norm", "weight")] = plain(k + "input_layernorm.weight", (d,), (d,))
    out[our + ("post_attn_norm", "weight")] = plain(k + "post_attention_layernorm.weight", (d,), (d,))
    out[our + ("attn", "q_proj")] = linear(k + "self_attn.q_proj.weight", (d, n, h), 1)
    out[our + ("attn", "k_proj")] = linear(k + "self_attn.k_proj.weight", (d, kv, h), 1)
    out[our + ("attn", "v_proj")] = linear(k + "self_attn.v_proj.weight", (d, kv, h), 1)
    out[our + ("attn", "o_proj")] = linear(k + "self_attn.o_proj.weight", (n, h, d), 2)
    if t.arch == "gpt_oss":
      out.update(_gpt_oss_layer(t, k, our))
      continue
    out[our + ("attn", "q_norm", "weight")] = plain(k + "self_attn.q_norm.weight", (h,), (h,))
    out[our + ("attn", "k_norm", "weight")] = plain(k + "self_attn.k_norm.weight", (h,), (h,))
    if t.is_moe:
      e, i = t.num_experts, t.moe_intermediate_size
      out[our + ("mlp", "router")] = linear(k + "mlp.gate.weight", (d, e), 1)
      for ours, theirs, shape in (("gate", "gate_proj", (e, d, i)), ("up", "up_proj", (e, d, i)),
                                  ("down", "down_proj", (e, i, d))):
        out[our + ("mlp", ours)] = stacked_linear([k + f"mlp.experts.{x}.{theirs}.weight" for x in range(e)], shape)
    else:
      i = t.intermediate_size
      out[our + ("mlp", "gate")] = linear(k + "mlp.gate_proj.weight", (d, i), 1)
      out[our + ("mlp", "up")] = linear(k + "mlp.up_proj.weight", (d, i), 1)
      out[our + ("mlp", "down")] = linear(k + "mlp.down_proj.weight", (i, d), 1)
  return out


def _gpt_oss_layer(t, k: str, our: Path) -> dict[Path, Spec]:
  """GPT-OSS's extras (REFERENCE.md §7.1): attention biases and sinks, the biased router, and the fused
  experts, which transformers stores in the module's own [E, in, out] layout (interleaved gate/up)."""
  d, n, kv, h = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
  e, i = t.num_experts, t.moe_intermediate_size
  a, x = k + "self_attn.", k + "mlp.experts."
  out = {our + ("attn", "sinks"): plain(a + "sinks", (n,), (n,))}
  if t.attention_bias:
    for s, heads in (("q", n), ("k", kv), ("v", kv)):
      out[our + ("attn", f"{s}_bias")] = plain(a + f"{s}_proj.bias", (heads * h,), (heads, h))
    out[our + ("attn", "o_bias")] = plain(a + "o_proj.bias", (d,), (d,))
  out[our + ("mlp", "router")] = linear(k + "mlp.router.weight", (d, e), 1)
  out[our + ("mlp", "router_bias")] = plain(k + "mlp.router.bias", (e,), (e,))
  for ours, theirs, shape in (("gate_up", "gate_up_proj", (e, d, 2 * i)), ("gate_up_bias", "gate_up_proj_bias", (e, 2 * i)),
                              ("down", "down_proj", (e, i, d)), ("down_bias", "down_proj_bias", (e, d))):
    out[our + ("mlp", ours)] = plain(x + theirs, shape, shape)
  return out


def _flash(cfg: InternVLConfig, layout: str) -> dict[Path, Spec]:
  """The Flash modules (REFERENCE.md §3.1, §7.2): original `mlp2.{0,1,4,7}`, `pooling_before_gating.*` (packed
  in_proj), `gating.blockK.{0,3,5}`, `gating.gate.{0,1}`; transformers' internvl_flash names otherwise."""
  dv, dl = cfg.vision.hidden_size, cfg.text.hidden_size
  c, n = dv * int(round(1 / cfg.downsample_ratio)) ** 4, vir.HEADS
  h, e = dv // n, vir.EXPANSION * dv
  hf = layout == "hf"
  out: dict[Path, Spec] = {}

  def layer_norm(ours, key, dim):
    out[ours + ("weight",)] = plain(key + ".weight", (dim,), (dim,))
    out[ours + ("bias",)] = plain(key + ".bias", (dim,), (dim,))

  m = "model.mlp2." if hf else "mlp2."
  layer_norm(("mlp2", "norm"), m + ("norm" if hf else "0"), c)
  for k, (idx, shape) in enumerate(((1, (c, 2 * dl)), (4, (2 * dl, 2 * dl)), (7, (2 * dl, dl))), start=1):
    key = m + (f"dense{k}" if hf else str(idx))
    out[("mlp2", f"dense{k}")] = linear(key + ".weight", shape, 1)
    out[("mlp2", f"bias{k}")] = plain(key + ".bias", (shape[1],), (shape[1],))
  p = ("model." if hf else "") + "pooling_before_gating."
  out[("pooling_before_gating", "query_token")] = plain(p + "query_token", (1, dv), (1, dv))
  for k in range(1, 5):
    a, ours = f"{p}attn{k}.", ("pooling_before_gating", f"attn{k}")
    if hf:
      out[ours + ("in_proj",)] = split_linear([a + f"{s}.weight" for s in ("query", "key", "value")], (dv, 3, n, h))
      out[ours + ("in_bias",)] = split_bias([a + f"{s}.bias" for s in ("query", "key", "value")], (3, n, h))
    else:
      out[ours + ("in_proj",)] = linear(a + "in_proj_weight", (dv, 3, n, h), 1)
      out[ours + ("in_bias",)] = plain(a + "in_proj_bias", (3 * dv,), (3, n, h))
    out[ours + ("out_proj",)] = linear(a + "out_proj.weight", (n, h, dv), 2)
    out[ours + ("out_bias",)] = plain(a + "out_proj.bias", (dv,), (dv,))
    layer_norm(("pooling_before_gating", f"norm{k}"), f"{p}norm{k}", dv)
  g = ("model." if hf else "") + "gating."
  for k in range(1, 5):
    b, ours = f"{g}block{k}.", ("gating", f"block{k}")
    names = ("dense_in", "dense_out", "norm") if hf else ("0", "3", "5")
    out[ours + ("fc1",)] = linear(b + names[0] + ".weight", (dv, e), 1)
    out[ours + ("fc1_bias",)] = plain(b + names[0] + ".bias", (e,), (e,))
    out[ours + ("fc2",)] = linear(b + names[1] + ".weight", (e, dv), 1)
    out[ours + ("fc2_bias",)] = plain(b + names[1] + ".bias", (dv,), (dv,))
    layer_norm(ours + ("norm",), b + names[2], dv)
  layer_norm(("gating", "gate_norm"), g + ("gate_norm" if hf else "gate.0"), dv)
  proj = g + ("gate_proj" if hf else "gate.1")
  out[("gating", "gate_proj")] = linear(proj + ".weight", (dv, 2), 1)
  out[("gating", "gate_bias")] = plain(proj + ".bias", (2,), (2,))
  return out


def specs(cfg: InternVLConfig, layout: str) -> dict[Path, Spec]:
  """Every parameter of `InternVL(cfg)` -> its checkpoint tensors in `layout` ('original' or 'hf')."""
  if layout not in ("original", "hf"):
    raise ValueError(f"unknown checkpoint layout {layout!r} (expected 'original' or 'hf')")
  n_run = cfg.vision.num_layers + 1 + cfg.vision.select_layer
  flash = _flash(cfg, layout) if cfg.flash is not None else {}
  return {**_vision(cfg, layout, n_run), **_projector(cfg, layout), **_language(cfg), **flash}


def skipped_vision_layers(cfg: InternVLConfig, layout: str) -> tuple[str, ...]:
  """Key prefixes of vision layers after `select_layer`: present in checkpoints, never run, not loaded."""
  n_run = cfg.vision.num_layers + 1 + cfg.vision.select_layer
  pre = "vision_tower.encoder.layer." if layout == "hf" else "vision_model.encoder.layers."
  return tuple(f"{pre}{i}." for i in range(n_run, cfg.vision.num_layers))
