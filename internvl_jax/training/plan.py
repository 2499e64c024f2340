"""Memory planner: per-device bytes of one training step, from abstract shapes and the real sharding rules.

  python -m internvl_jax.training.plan --model=InternVL3.5-241B-A28B --mesh=fsdp:64,expert:8 --device-memory=95GiB \
      --batch=512 --seq=32768 [--remat=full] [--loss-chunk=2048] [--json]
  python -m internvl_jax.training.plan --model=InternVL3.5-38B --devices=64 --device-memory=95GiB --recommend

Nothing is allocated: the model is built with `nnx.eval_shape`, every parameter's per-device shard follows
from its `logical_axes` through `sharding.logical_to_spec` on a `jax.sharding.AbstractMesh`, and every
activation is a (shape, logical axes, dtype) that goes through the same rule. Per-device bytes of a tensor
= itemsize x prod over dims of ceil(dim / product of the mesh axes its spec assigns to that dim).

Categories (per device):
  parameters   every parameter in param_dtype (frozen parts too).
  gradients    trainable parameters only, sharded and typed like them; x2 with accumulation (> 1 micro-batch:
               the scan carries a sum while the next micro-batch's gradient is built).
  optimiser    AdamW: mu and nu per trainable parameter, like it (optax keeps the parameter dtype).
  activations  the peak over the phases of the step (below), for one micro-batch of batch / accum rows.

Activations, per token of a micro-batch (c = compute itemsize, d width, n / kv heads, h head_dim, I MLP width):
  saved by a decoder layer without remat (= what `saved_residuals` lists, checked in tests/test_plan.py):
    each RMSNorm its float32 input, the normalised value and the output: (4 + 2c) d, twice;
    q and k: float32 copy for their norm, normed, roped; v; the attention output: (4 + 3c)(n + kv) h;
    RoPE cos/sin 8h; per-row norm statistics; flash keeps only a log-sum-exp besides (4n), XLA attention
    the mask, masked logits and exp in float32 and the probabilities: (9 + c) n seq, quadratic in seq;
    dense SwiGLU: gate, silu (3 residuals), up, product: 6 c I;
    MoE: router softmax + top-k (float32), then per routed copy (top-k per token) the gathered input, gate,
    silu (3), up, product and expert output: k (2d + 6I) c — the biggest per-token term of the 241B;
    and the compute-dtype casts of every layer's weights (sharded like the parameters).
    Expert-parallel MoE (moe.moe_expert_parallel, whenever the 'expert' axis ep divides the experts)
    sorts its whole expert group's tokens into one static buffer: ep x k rows per own token (I over 'tensor').
  remat 'full' keeps only each layer's input (c d); 'save_dots' the input and the outputs of the weight
    matmuls that are residuals (q, k, v, o; gate and up; the router): ragged_dot / gmm experts are recomputed.
  InternViT layer without remat: two norms (LayerNorm (12 + c) d, RMSNorm (4 + 2c) d), q, k, v, attention
    out, projection and fc2 outputs (the layer scales need them), GELU (4 residuals: 4 c I); per tile
    1 + grid^2 tokens (1025). The projector (LayerNorm over 4 x ViT width, GELU) and the patch embedding's
    input are saved in any case; a frozen ViT saves nothing (no gradient flows into it).
  layer working set (backward of one layer): its whole 'none' set recomputed (remat only), two activation
    gradients (c d) and twice the layer's weights as FSDP gathers them (weights + their gradient before the
    reduce-scatter), compute dtype, divided only by 'tensor' / 'expert'. On the Pallas per-shard MoE path
    (no expert parallelism) the experts enter shard_map whole, so all E experts of the layer count.
  head: the final RMSNorm, then logits [seq, vocab] in c, the float32 exp the loss keeps, the float32 logit
    gradient: (c + 8) x vocab per token, over 'tensor' when it divides the vocabulary (32K x 151,936: 46 GiB
    per row). --loss-chunk=N (sft.chunked_next_token_ce) keeps a copy of the hidden states and N positions'
    logits at a time; plus the gathered lm_head and its gradient.
  inputs: the whole step's local rows (accumulation scans inside the step): 20 bytes per token (ids, labels,
    segments, positions, weights) and float32 pixel values (2.3 MiB per 448 px tile).
  phases: head = inputs + ViT, projector, embeddings and decoder saved + head; decoder = the same with one
    decoder layer's working set instead of the head; vit = inputs + ViT saved + one ViT layer's working set;
    update = the optimiser's update tree (one trainable-parameter copy). The largest is the estimate.
Rows shard over the batch axes (data x fsdp x expert, `RULES['batch']`); the sequence is not sharded.
Not counted: XLA workspace, fragmentation, prefetch of the next layer's weights, collectives' buffers.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys

import jax
import numpy as np
from flax import nnx

from internvl_jax import sharding, zoo
from internvl_jax.model import moe
from internvl_jax.model.internvl import InternVL
from internvl_jax.training.optim import PARTS

GiB = 2 ** 30
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str) -> int:
  """'95GiB', '80GB', '16 GiB', '1.5TiB', '1000' -> bytes (GB = 10^9, GiB = 2^30)."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise ValueError(f"bad size {text!r}: use a number with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, e.g. 95GiB")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_mesh(text: str, devices: int | None = None) -> dict[str, int]:
  """'fsdp:64,expert:8' -> sizes of all four mesh axes (absent: 1; one axis may be -1 with `devices`)."""
  shape = {a: 1 for a in sharding.MESH_AXES}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, size = item.partition(":")
    if name not in shape:
      raise ValueError(f"unknown mesh axis {name!r} in {text!r}; axes are {', '.join(sharding.MESH_AXES)}")
    try:
      shape[name] = int(size)
    except ValueError:
      raise ValueError(f"mesh axis {name!r} needs an integer size (e.g. {name}:8), got {item!r}") from None
    if shape[name] < 1 and shape[name] != -1:
      raise ValueError(f"mesh axis {name!r} has size {shape[name]}")
  rest = math.prod(s for s in shape.values() if s != -1)
  if -1 in shape.values():
    if list(shape.values()).count(-1) > 1 or not devices or devices % rest:
      raise ValueError(f"mesh {text!r}: one axis may be -1, and only with --devices divisible by {rest}")
    shape[next(a for a, s in shape.items() if s == -1)] = devices // rest
  if devices and math.prod(shape.values()) != devices:
    raise ValueError(f"mesh {text!r} has {math.prod(shape.values())} devices, --devices says {devices}")
  return shape


def abstract_mesh(shape: dict[str, int]) -> jax.sharding.AbstractMesh:
  return jax.sharding.AbstractMesh(tuple(shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def shard_bytes(shape, axes, itemsize: int, mesh) -> int:
  """Bytes of one device's shard of an array with these logical axes (leading dims; the rest None) under
  `sharding.RULES`."""
  axes = tuple(axes or ()) + (None,) * (len(shape) - len(axes or ()))  # trailing dimensions unsharded
  spec = sharding.logical_to_spec(axes, shape, mesh)
  split = [math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())) for s in spec]
  return itemsize * math.prod(-(-d // k) for d, k in zip(shape, split))


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """One parameter: its path, shape, itemsize and logical axes."""
  path: tuple
  shape: tuple
  itemsize: int
  axes: tuple

  @property
  def group(self) -> str:
    """The unit FSDP gathers at once: a layer, or a top-level module outside the layer stacks."""
    p = [str(x) for x in self.path]
    return "/".join(p[:3]) if len(p) > 2 and p[1] == "layers" else "/".join(p[:2] if p[0] != "mlp1" else p[:1])


@functools.lru_cache(maxsize=16)
def parameters(cfg) -> tuple[ParamInfo, ...]:
  """Every nnx.Param of the model, from abstract shapes (nnx.eval_shape: nothing allocated)."""
  model = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))
  return tuple(ParamInfo(tuple(path), tuple(v.get_value().shape), np.dtype(v.get_value().dtype).itemsize,
                 tuple(getattr(v, "logical_axes", None) or ()))
               for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _tensors_bytes(tensors, mesh) -> int:
  return sum(shard_bytes(shape, axes, size, mesh) for shape, axes, size in tensors)


def _decoder_sets(t, rows, seq, c, attention, routed_rows: int = 1, routed_mlp=None):
  """(input, 'none' saved set, 'save_dots' extra) of one decoder layer: lists of (shape, axes, itemsize).
  MoE: each device's routed buffers hold `routed_rows` x its own tokens x top-k rows (expert parallelism
  gathers its expert group's tokens), their hidden width split as `routed_mlp` ('mlp' or None) says.

  The 'none' set is what `jax.ad_checkpoint.saved_residuals` lists for a DecoderLayer (checked to 1 %);
  'save_dots' what it lists under that policy (exact); the compute-dtype weight casts are added by `plan`."""
  d, n, kv, h = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
  tok, q, k = ("batch", "length", None), ("batch", "length", "heads", "head_dim"), \
      ("batch", "length", "kv_heads", "head_dim")
  x = ([rows, seq, d], tok, c)
  qs, ks = ([rows, seq, n, h], q, c), ([rows, seq, kv, h], k, c)
  norm = [([rows, seq, d], tok, 4), x, x]  # RMSNorm: float32 input, normalised, times the weight
  none = norm * 2 + [([rows, seq, n, h], q, 4), qs, qs, qs,  # q: float32 for its norm, normed, roped; attn out
                     ([rows, seq, kv, h], k, 4), ks, ks, ks,  # k: the same; v
                     ([rows, seq, 4 * h // 2], tok, 4)]  # RoPE cos and sin for q and k
  # per-token float32 scalars: two per RMSNorm row (4 + per-head q and k norms), router top-k sums
  stats = 4 + 2 * (n + kv) + (2 if t.is_moe else 0) + (2 * n if attention == "xla" else 0)
  none.append(([rows, seq, stats], tok, 4))
  if attention == "xla":  # mask, masked logits and exp (float32), probabilities; softmax sums in `stats`
    none.append(([rows, n, seq, seq], ("batch", "heads", None, None), 9 + c))
  else:  # the kernel's log-sum-exp (q, k, v and out are above)
    none.append(([rows, seq, n], ("batch", "length", "heads"), 4))
  dots = [qs, ks, ks, x]  # q, k, v, o projections
  if t.is_moe:
    e, r, i = t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size
    # per routed copy: gathered input, gate, silu (3 residuals), up, product, expert output
    routed = lambda width, axis: ([rows * seq, routed_rows * r, width], ("batch", None, axis), c)
    none += [([rows, seq, e + r], tok, 4), x] + [routed(d, None)] * 2 + [routed(i, routed_mlp)] * 6
    dots.append(([rows, seq, e], tok, c))  # the router; ragged_dot / gmm are not dot_general: recomputed
  else:
    mlp = ([rows, seq, t.intermediate_size], ("batch", "length", "mlp"), c)
    none += [mlp] * 6  # gate, silu (3 residuals), up, product
    dots += [mlp, mlp]
  return x, none, dots


def _vit_sets(v, tiles, c, attention):
  """(input, 'none' saved set, 'save_dots' extra) of one InternViT layer over `tiles` tiles (checked the
  same way as `_decoder_sets`)."""
  d, n, s = v.hidden_size, v.num_heads, 1 + v.grid ** 2
  tok, heads = ("batch", "length", None), ("batch", "length", "heads", "head_dim")
  x = ([tiles, s, d], tok, c)
  f32 = ([tiles, s, d], tok, 4)
  norm = [f32, f32, f32, x] if v.norm_type == "layer_norm" else [f32, x, x]
  att = ([tiles, s, n, v.head_dim], heads, c)
  fc = ([tiles, s, v.intermediate_size], ("batch", "length", "mlp"), c)
  # q, k, v, attention out, projection and fc2 outputs (their layer scales need them), gelu (4 residuals)
  none = norm * 2 + [att] * 4 + [x, x] + [fc] * 4 + ([f32, x] * 2 if v.qk_norm else [])
  # per-token float32 scalars: two per norm, two per head for the XLA softmax
  none.append(([tiles, s, 4 + (4 if v.qk_norm else 0) + (2 * n if attention == "xla" else 0)], tok, 4))
  if attention == "xla":
    none.append(([tiles, n, s, s], ("batch", "heads", None, None), 4 + c))
  else:
    none.append(([tiles, s, n], ("batch", "length", "heads"), 4))
  qkv = ([tiles, s, 3, n, v.head_dim], ("batch", "length", None, "heads", "head_dim"), c)
  return x, none, [qkv, x, fc, x]


def plan(model, mesh_shape: dict[str, int], *, batch: int, seq: int, device_memory: int, tiles: int | None = None,
         accum: int | None = None, remat: str = "full", dtype: str = "bfloat16", param_dtype: str = "float32",
         trainable=PARTS, attention: str = "flash", moe_impl: str = "pallas", loss_chunk: int = 0) -> dict:
  """Per-device bytes of a training step (see the module docstring). `model`: a preset name or an
  InternVLConfig. Returns a JSON-able dict."""
  cfg = (zoo.get(model) if isinstance(model, str) else model).replace(dtype=dtype, param_dtype=param_dtype)
  model = model if isinstance(model, str) else "custom"
  if remat not in ("none", "full", "save_dots"):
    raise ValueError(f"unknown remat {remat!r}: none, full or save_dots")
  if set(trainable) - set(PARTS) or not trainable:
    raise ValueError(f"trainable parts {tuple(trainable)}: choose from {', '.join(PARTS)}")
  if batch < 1 or seq < 2:
    raise ValueError(f"batch {batch} and seq {seq}: need at least 1 row of 2 tokens")
  v, t, c = cfg.vision, cfg.text, np.dtype(dtype).itemsize
  tiles = round(96 * seq / 32768) if tiles is None else tiles  # official density: 96 tiles per 32K row
  if tiles * cfg.tokens_per_tile > seq:
    raise ValueError(f"{tiles} tiles x {cfg.tokens_per_tile} tokens exceed the {seq}-token row")
  mesh = abstract_mesh(mesh_shape)
  gathered = abstract_mesh({**mesh_shape, "data": 1, "fsdp": 1})  # what FSDP all-gathers for compute
  per_dev_rows = shard_bytes((batch,), ("batch",), 1, mesh)
  accum = per_dev_rows if accum is None else accum  # default: one row per device per micro-batch
  if accum < 1 or batch % accum:
    raise ValueError(f"accum {accum} must divide the batch of {batch} rows")
  rows = batch // accum

  params = parameters(cfg)
  train = [p for p in params if str(p.path[0]) in trainable]
  p_bytes = sum(shard_bytes(p.shape, p.axes, p.itemsize, mesh) for p in params)
  g_bytes = sum(shard_bytes(p.shape, p.axes, p.itemsize, mesh) for p in train)
  # The MoE path the code takes: expert-parallel whenever the 'expert' axis divides the experts (where
  # moe.py has it); else the Pallas per-shard path with the experts whole (P()), or GSPMD's ragged_dot.
  ep = mesh_shape["expert"]
  moe_path = ("expert-parallel" if t.is_moe and ep > 1 and t.num_experts % ep == 0
              and hasattr(moe, "moe_expert_parallel") else moe_impl)
  token_axes = sharding.logical_to_spec(("batch",), (rows * seq,), mesh)[0] or ()
  token_axes = (token_axes,) if isinstance(token_axes, str) else token_axes
  routed_rows = ep if moe_path == "expert-parallel" and "expert" in token_axes else 1  # all-gathered group
  groups: dict[str, int] = {}
  for p in params:
    whole = "expert" in p.axes and moe_path == "pallas"  # experts enter the MoE shard_map with P()
    groups[p.group] = groups.get(p.group, 0) + (c * math.prod(p.shape) if whole else
                                                shard_bytes(p.shape, p.axes, c, gathered))
  weights = lambda prefix: 2 * max((b for g, b in groups.items() if g.startswith(prefix)), default=0)
  # without remat autodiff also keeps every layer's compute-dtype weight casts (sharded like the parameters)
  casts = lambda prefix: sum(shard_bytes(p.shape, p.axes, c, mesh) for p in params if p.group.startswith(prefix))

  tok = ("batch", "length", None)
  inputs = _tensors_bytes([([batch, seq], ("batch",), 20)] + ([([batch, tiles, v.image_size ** 2 * 3], ("batch",), 4)]
                                                             if tiles else []), mesh)
  x, none, dots = _decoder_sets(t, rows, seq, c, attention, routed_rows,
                                "mlp" if moe_path == "expert-parallel" else None)
  saved = {"none": none, "full": [x], "save_dots": [x] + dots}[remat]
  dec_saved = t.num_layers * _tensors_bytes(saved, mesh) + (casts("language_model/layers") if remat == "none" else 0)
  dec_work = weights("language_model/layers") + _tensors_bytes([x, x] + (none if remat != "none" else []), mesh)
  embed = _tensors_bytes([x], mesh)
  vocab = ("batch", "length", "vocab")
  head = _tensors_bytes([([rows, seq, t.hidden_size], tok, 4), x, x], mesh)  # the final RMSNorm
  if loss_chunk:  # a chunk-major copy of the hidden states, one chunk's logits at a time
    head += _tensors_bytes([x, ([rows, min(loss_chunk, seq), t.vocab_size], vocab, c + 8)], mesh)
  else:
    head += _tensors_bytes([([rows, seq, t.vocab_size], vocab, c + 8)], mesh)
  head += weights("language_model/lm_head" if not t.tie_word_embeddings else "language_model/embed_tokens")

  vit_saved = vit_work = proj = 0
  if tiles:
    n_tiles, s2 = rows * tiles, cfg.tokens_per_tile
    vit_layers = len([g for g in groups if g.startswith("vision_model/layers/")])
    vx, vnone, vdots = _vit_sets(v, n_tiles, c, attention)
    vit_grad = "vision_model" in trainable
    if vit_grad:
      vit_saved = vit_layers * _tensors_bytes({"none": vnone, "full": [vx], "save_dots": [vx] + vdots}[remat], mesh)
      vit_saved += _tensors_bytes([([n_tiles, v.grid ** 2, v.patch_size ** 2 * 3], tok, c)], mesh)  # patch embed
      vit_saved += casts("vision_model/layers") if remat == "none" else 0
    # frozen: a forward pass only, one layer's intermediates and weights at a time
    vit_work = weights("vision_model/layers") // (1 if vit_grad else 2) + _tensors_bytes(
        [vx, vx] + (vnone if remat != "none" or not vit_grad else []), mesh)
    if vit_grad or "mlp1" in trainable:  # LayerNorm over 4 x ViT width, then GELU (4 residuals)
      w_in = v.hidden_size * round(1 / cfg.downsample_ratio) ** 2
      proj = _tensors_bytes([([n_tiles, s2, w_in], tok, 12 + c)] + [([n_tiles, s2, t.hidden_size], tok, c)] * 4, mesh)
  before = inputs + vit_saved + proj + embed + dec_saved
  phases = {"head": before + head, "decoder": before + dec_work, "vit": inputs + vit_saved + vit_work,
            "update": g_bytes}
  peak = max(phases, key=phases.get)
  grads = g_bytes * (2 if accum > 1 else 1)
  total = p_bytes + grads + 2 * g_bytes + phases[peak]
  ratio = total / device_memory
  verdict = (f"fits ({100 * ratio:.0f}% of {device_memory / GiB:.0f} GiB)" if ratio <= 1 else
             f"does not fit: needs {total / GiB:.1f} GiB of {device_memory / GiB:.0f} GiB")
  return dict(
      model=model, mesh={a: s for a, s in mesh_shape.items()}, devices=math.prod(mesh_shape.values()),
      batch=batch, seq=seq, tiles_per_row=tiles, accum=accum, rows_per_device=per_dev_rows,
      micro_rows_per_device=shard_bytes((rows,), ("batch",), 1, mesh), remat=remat, dtype=dtype,
      param_dtype=param_dtype, trainable=list(trainable), attention=attention, moe_impl=moe_impl,
      moe_path=moe_path if t.is_moe else None,
      loss_chunk=loss_chunk, params=sum(math.prod(p.shape) for p in params),
      bytes=dict(parameters=p_bytes, gradients=grads, optimizer=2 * g_bytes, activations=phases[peak], total=total),
      activations=dict(inputs=inputs, vit_saved=vit_saved, projector_saved=proj, embeddings=embed,
                       decoder_saved=dec_saved, decoder_layer_work=dec_work, vit_layer_work=vit_work, head=head,
                       phases=phases, peak_phase=peak),
      device_memory=device_memory, fits=ratio <= 1, verdict=verdict)


def mesh_str(shape: dict[str, int]) -> str:
  """{'fsdp': 64, 'expert': 8, ...} -> 'fsdp:64,expert:8' (axes of size 1 left out)."""
  return ",".join(f"{a}:{s}" for a, s in shape.items() if s > 1) or "fsdp:1"


def candidates(model: str, devices: int) -> list[dict[str, int]]:
  """Meshes worth comparing on `devices` chips: FSDP alone, with tensor parallelism (2-8), with an expert
  axis (MoE: sizes dividing the expert count), both, and FSDP within 8-chip hosts with data-parallel
  replicas across them."""
  t = zoo.get(model).text
  experts = [e for e in (1, 2, 4, 8, 16, 32, 64) if not t.is_moe and e == 1 or t.is_moe and t.num_experts % e == 0]
  out = []
  for tensor in (1, 2, 4, 8):
    for expert in experts:
      if devices % (tensor * expert) == 0:
        out.append(dict(data=1, fsdp=devices // (tensor * expert), tensor=tensor, expert=expert))
  if devices > 8 and devices % 8 == 0:
    out.append(dict(data=devices // 8, fsdp=8, tensor=1, expert=1))
  return out


def recommend(model: str, devices: int, **kw) -> tuple[list[dict], dict | None]:
  """Plans of every candidate mesh, lowest total first, and the recommended one: among those that fit,
  the least tensor parallelism (it adds collectives on every layer's activations; FSDP's weight gathers
  overlap with compute), then the fewest data-parallel replicas, then the lowest memory. None if none fits."""
  plans = sorted((plan(model, m, **kw) for m in candidates(model, devices)), key=lambda p: p["bytes"]["total"])
  fitting = [p for p in plans if p["fits"]]
  best = min(fitting, key=lambda p: (p["mesh"]["tensor"], p["mesh"]["data"], p["bytes"]["total"]), default=None)
  return plans, best


def _gib(b: int) -> str:
  return f"{b / GiB:10.2f}"


def report(p: dict) -> str:
  """The human-readable table of one plan."""
  a, b = p["activations"], p["bytes"]
  lines = [
      f"{p['model']}: {p['params'] / 1e9:.1f}B parameters; mesh {mesh_str(p['mesh'])} ({p['devices']} devices)",
      f"batch {p['batch']} rows x {p['seq']} tokens, {p['tiles_per_row']} tiles per row: {p['rows_per_device']} "
      f"row(s) per device per step, accum {p['accum']} -> {p['micro_rows_per_device']} row(s) per device per "
      "micro-batch",
      f"compute {p['dtype']}, parameters {p['param_dtype']}, remat {p['remat']}, attention {p['attention']}, "
      f"MoE {p['moe_path'] or '-'}, loss chunk {p['loss_chunk'] or 'none (whole logits)'}; trainable "
      f"{', '.join(p['trainable'])}",
      "", f"{'per device':34s}{'GiB':>10s}",
      f"  {'parameters':32s}{_gib(b['parameters'])}", f"  {'gradients':32s}{_gib(b['gradients'])}",
      f"  {'optimiser (AdamW mu, nu)':32s}{_gib(b['optimizer'])}",
      f"  {'activations (peak: ' + a['peak_phase'] + ')':32s}{_gib(b['activations'])}",
      f"  {'total':32s}{_gib(b['total'])}", "", "activation terms",
      f"  {'inputs':32s}{_gib(a['inputs'])}", f"  {'ViT saved':32s}{_gib(a['vit_saved'])}",
      f"  {'projector saved':32s}{_gib(a['projector_saved'])}", f"  {'embeddings':32s}{_gib(a['embeddings'])}",
      f"  {'decoder saved (all layers)':32s}{_gib(a['decoder_saved'])}",
      f"  {'decoder layer working set':32s}{_gib(a['decoder_layer_work'])}",
      f"  {'ViT layer working set':32s}{_gib(a['vit_layer_work'])}",
      f"  {'head (logits + loss)':32s}{_gib(a['head'])}",
      "  phases: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in a["phases"].items()),
      "", f"device memory {p['device_memory'] / GiB:.1f} GiB: {p['verdict']}"]
  if p["fits"] and p["bytes"]["total"] > 0.9 * p["device_memory"]:
    lines.append("  tight: XLA workspace and fragmentation are not counted")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m internvl_jax.training.plan", description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a preset: " + ", ".join(zoo.PRESETS))
  parser.add_argument("--mesh", help="e.g. fsdp:64,expert:8 (axes data, fsdp, tensor, expert; absent = 1)")
  parser.add_argument("--devices", type=int, help="device count (with --recommend, or a -1 mesh axis)")
  parser.add_argument("--device-memory", required=True, help="per device, e.g. 95GiB, 80GB")
  parser.add_argument("--batch", type=int, default=512, help="global rows per optimiser step (official 512)")
  parser.add_argument("--seq", type=int, default=32768, help="tokens per packed row (official 32768)")
  parser.add_argument("--tiles", type=int, help="image tiles per row (default 96 per 32768 tokens, pro rata)")
  parser.add_argument("--accum", type=int, help="micro-batches per step (default: 1 row per device each)")
  parser.add_argument("--remat", default="full", choices=("none", "full", "save_dots"))
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
  parser.add_argument("--param-dtype", default="float32", help="parameter (master weight) dtype")
  parser.add_argument("--trainable", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
  parser.add_argument("--attention", default="flash", choices=("flash", "xla"))
  parser.add_argument("--moe-impl", default="pallas", choices=("pallas", "xla"),
                      help="MoE path without expert parallelism (an expert axis dividing the experts takes it)")
  parser.add_argument("--loss-chunk", type=int, default=0, help="positions per loss chunk (0: whole logits)")
  parser.add_argument("--recommend", action="store_true", help="compare meshes for --devices, recommend one")
  parser.add_argument("--json", action="store_true", help="machine-readable output")
  args = parser.parse_args(argv)
  try:
    zoo.get(args.model)
    for name in (args.dtype, args.param_dtype):
      if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {name!r}: float32, bfloat16 or float16")
    kw = dict(batch=args.batch, seq=args.seq, device_memory=parse_size(args.device_memory), tiles=args.tiles,
              accum=args.accum, remat=args.remat, dtype=args.dtype, param_dtype=args.param_dtype,
              trainable=tuple(s.strip() for s in args.trainable.split(",") if s.strip()), attention=args.attention,
              moe_impl=args.moe_impl, loss_chunk=args.loss_chunk)
    if args.recommend:
      if not args.devices:
        raise ValueError("--recommend needs --devices")
      plans, best = recommend(args.model, args.devices, **kw)
    else:
      if not args.mesh:
        raise ValueError("give --mesh (or --recommend with --devices)")
      result = plan(args.model, parse_mesh(args.mesh, args.devices), **kw)
  except (KeyError, ValueError) as e:
    parser.error(str(e.args[0]) if e.args else str(e))
  if not args.recommend:
    print(json.dumps(result, indent=1) if args.json else report(result))
    return
  if args.json:
    print(json.dumps(dict(plans=plans, recommended=best), indent=1))
    return
  print(f"{args.model} on {args.devices} devices of {kw['device_memory'] / GiB:.0f} GiB, batch {args.batch} x "
        f"{args.seq}, remat {args.remat}, loss chunk {args.loss_chunk or 'none'}")
  print(f"{'mesh':34s}{'params':>8s}{'grads':>8s}{'adam':>8s}{'activ.':>8s}{'total':>8s}  verdict (GiB)")
  shown = plans[:12] + ([best] if best and best not in plans[:12] else [])  # the lowest totals
  for p in shown:
    b = p["bytes"]
    print(f"{mesh_str(p['mesh']):34s}" + "".join(f"{b[k] / GiB:8.1f}" for k in
          ("parameters", "gradients", "optimizer", "activations", "total")) + f"  {p['verdict']}")
  if len(plans) > len(shown):
    print(f"({len(plans) - len(shown)} more meshes with larger totals: --json lists all)")
  print(f"recommended: {mesh_str(best['mesh'])} ({best['verdict']})" if best else
        f"nothing fits; the smallest total is {plans[0]['bytes']['total'] / GiB:.1f} GiB ({mesh_str(plans[0]['mesh'])})")


if __name__ == "__main__":
  main(sys.argv[1:])
