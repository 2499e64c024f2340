"""The memory planner: parameter and optimiser bytes equal the real shards on 8 simulated devices, the
activation sets equal what autodiff saves, and the CLI's verdicts, JSON and errors. Abstract only: fast."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from internvl_jax import sharding, zoo
from internvl_jax.config import KernelConfig
from internvl_jax.training import optim
from internvl_jax.training import plan
from internvl_jax.training import sft
from internvl_jax.model.internvl import InternVL, init_model

GiB = 2 ** 30
ALL = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
BIG = dict(batch=512, seq=32768, device_memory=95 * GiB)


def tiny(name, mesh_shape, **kw):
  return plan.plan(name, {**ALL, **mesh_shape}, **{**dict(batch=8, seq=64, tiles=2, device_memory=GiB), **kw})


@pytest.mark.parametrize("name,mesh_shape,param_dtype", [
    ("tiny-dense", {"fsdp": 4, "tensor": 2}, "float32"),
    ("tiny-moe", {"fsdp": 2, "tensor": 2, "expert": 2}, "bfloat16"),
    ("tiny-gpt-oss", {"fsdp": 2, "tensor": 2, "expert": 2}, "bfloat16"),
])
def test_parameter_bytes_equal_the_real_shards(name, mesh_shape, param_dtype):
  """Every device holds exactly the planner's bytes once the model is initialised in its shardings."""
  mesh = sharding.make_mesh(mesh_shape)
  model = init_model(zoo.get(name).replace(param_dtype=param_dtype), mesh=mesh)
  held = {d: 0 for d in mesh.devices.flat}
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    for shard in leaf.addressable_shards:
      held[shard.device] += shard.data.nbytes
  p = tiny(name, mesh_shape, param_dtype=param_dtype)
  assert set(held.values()) == {p["bytes"]["parameters"]}
  assert p["params"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("trainable", [optim.PARTS, ("mlp1",), ("vision_model", "mlp1")])
def test_optimiser_and_gradients_follow_the_train_state(trainable):
  """AdamW's mu and nu, sharded by `sft.state_shardings`, take 2x the trainable parameters' bytes; frozen
  parts have neither gradients nor optimiser state."""
  mesh_shape = {"fsdp": 2, "tensor": 2, "expert": 2}
  mesh = sharding.make_mesh(mesh_shape)
  model = nnx.eval_shape(lambda: InternVL(zoo.get("tiny-moe"), rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  train, frozen = optim.split_trainable(params, trainable)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  abstract = jax.eval_shape(lambda t, f: sft.TrainState(step=jnp.zeros((), jnp.int32), params=t, frozen=f,
                                                        opt_state=tx.init(t), key=jnp.zeros((2,), jnp.uint32)),
                            train, frozen)
  shardings = sft.state_shardings(abstract, mesh, tx)
  is_var = lambda x: isinstance(x, nnx.Variable)
  shard_bytes = lambda tree, sh: sum(
      math.prod(s.shard_shape(v.shape)) * np.dtype(v.dtype).itemsize
      for v, s in zip(jax.tree.leaves(tree, is_leaf=is_var), jax.tree.leaves(sh)) if len(v.shape))
  adam = shard_bytes(abstract.opt_state, shardings.opt_state)
  trained = shard_bytes(abstract.params, shardings.params)
  p = tiny("tiny-moe", mesh_shape, trainable=trainable, accum=1)
  assert p["bytes"]["optimizer"] == adam == 2 * trained
  assert p["bytes"]["gradients"] == trained
  assert p["bytes"]["parameters"] == trained + shard_bytes(abstract.frozen, shardings.frozen)
  if "vision_model" not in trainable:
    assert p["activations"]["vit_saved"] == 0  # no gradient flows into a frozen ViT


def test_accumulation_doubles_gradients():
  one, four = (tiny("tiny-dense", {"fsdp": 8}, batch=64, accum=a) for a in (1, 4))  # 8 or 2 rows per device
  assert four["bytes"]["gradients"] == 2 * one["bytes"]["gradients"]
  assert four["bytes"]["activations"] < one["bytes"]["activations"]  # 1/4 of the rows per micro-batch


def _residual_bytes(f, *args):
  from jax._src.ad_checkpoint import saved_residuals  # private, but pinned with jax: an ImportError fails
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in saved_residuals(f, *args)
             if "from the argument" not in why and "from a constant" not in why)  # only what the layer computes


@pytest.mark.parametrize("moe", [False, True])
def test_decoder_sets_equal_the_saved_residuals(moe, monkeypatch):
  """plan's 'none' set (+ the layer's compute-dtype weight casts) and 'save_dots' set against the residuals
  JAX keeps for a bfloat16 DecoderLayer (XLA attention, so the scores are part of it). The batched XLA form
  is what runs under a training mesh; the CPU's single-device head-wise form saves other residuals."""
  monkeypatch.setattr("internvl_jax.model.backend.headwise_pays", lambda: False)
  monkeypatch.setattr("internvl_jax.model.backend.wide_products", lambda: False)  # the accelerators' form, as plan models
  from internvl_jax.model import qwen3
  from internvl_jax.config import TextConfig
  from internvl_jax.model.layers import remat_policy
  kw = dict(vocab_size=256, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
            intermediate_size=256)
  if moe:
    kw.update(arch="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
  t, (b, length) = TextConfig(**kw), (2, 64)
  layer = qwen3.DecoderLayer(t, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                             kernels_cfg=KernelConfig(attention="xla", moe="xla"))
  graphdef, state = nnx.split(layer)
  pos, seg = jnp.zeros((b, length), jnp.int32), jnp.ones((b, length), jnp.int32)

  def f(state, x):
    y, stats, _ = nnx.merge(graphdef, state)(x, pos, seg)
    return jnp.sum(y.astype(jnp.float32)) + (0 if stats is None else jnp.sum(stats[1]))
  x = jnp.zeros((b, length, t.hidden_size), jnp.bfloat16)
  _, none, dots = plan._decoder_sets(t, b, length, 2, "xla")
  mesh = plan.abstract_mesh(ALL)
  casts = sum(2 * int(np.prod(v.shape)) for v in jax.tree.leaves(state))
  assert plan._tensors_bytes(none, mesh) + casts == pytest.approx(_residual_bytes(f, state, x), rel=0.02)
  ours = plan._tensors_bytes(dots, mesh)
  assert ours == pytest.approx(_residual_bytes(jax.checkpoint(f, policy=remat_policy("save_dots")), state, x), rel=0.01)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-6b"])
def test_vit_sets_equal_the_saved_residuals(name, monkeypatch):
  monkeypatch.setattr("internvl_jax.model.backend.headwise_pays", lambda: False)  # as in the decoder test
  monkeypatch.setattr("internvl_jax.model.backend.wide_products", lambda: False)
  from internvl_jax.model import intern_vit
  from internvl_jax.model.layers import remat_policy
  v = zoo.get(name).vision
  layer = intern_vit.InternViTLayer(v, 0.0, param_dtype=jnp.float32, kernels_cfg=KernelConfig(attention="xla"), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  f = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x).astype(jnp.float32))
  x = jnp.zeros((3, 1 + v.grid ** 2, v.hidden_size), jnp.bfloat16)
  _, none, dots = plan._vit_sets(v, 3, 2, "xla")
  mesh = plan.abstract_mesh(ALL)
  casts = sum(2 * int(np.prod(v.shape)) for v in jax.tree.leaves(state))
  assert plan._tensors_bytes(none, mesh) + casts == pytest.approx(_residual_bytes(f, state, x), rel=0.02)
  ours = plan._tensors_bytes(dots, mesh)
  assert ours == pytest.approx(_residual_bytes(jax.checkpoint(f, policy=remat_policy("save_dots")), state, x), rel=0.01)


def test_remat_and_loss_chunk_order_the_activations():
  kw = dict(model="InternVL3.5-8B", mesh_shape={**ALL, "fsdp": 8}, batch=8, seq=32768, device_memory=80 * GiB)
  act = {r: plan.plan(remat=r, **kw)["bytes"]["activations"] for r in ("none", "save_dots", "full")}
  assert act["full"] < act["save_dots"] < act["none"]
  whole, chunked = plan.plan(**kw), plan.plan(loss_chunk=2048, **kw)
  # [32768, 151936] logits: bfloat16 + float32 exp + float32 gradient = 10 bytes per entry, > 46 GiB
  assert whole["activations"]["head"] > 46 * GiB > 10 * GiB > chunked["activations"]["head"]
  assert plan.plan(attention="xla", **kw)["bytes"]["activations"] > whole["bytes"]["activations"]


# WORKSPACE.md's verdict table (official recipe: 512 rows x 32768 tokens, 96 tiles per row, bf16 compute over f32
# master weights, AdamW, remat full): model, mesh, GiB of device memory, loss_chunk -> activations and total in
# GiB per device as printed there (to 0.1 GiB), and whether it fits.
VERDICTS = [
    ("InternVL3.5-8B", "fsdp:8", 80, 2048, 39.1, 58.9, True),
    ("InternVL3.5-8B", "fsdp:8", 80, 0, 79.4, 99.3, False),
    ("InternVL3.5-38B", "fsdp:64", 95, 2048, 70.8, 82.0, True),
    ("InternVL3.5-241B-A28B", "fsdp:128,tensor:2,expert:2", 95, 2048, 74.6, 84.0, True),
    ("InternVL3.5-241B-A28B", "fsdp:64,expert:8", 95, 2048, 130.2, 140.0, False),
]


@pytest.mark.parametrize("model,mesh,gib,loss_chunk,activations,total,fits", VERDICTS)
def test_the_documented_verdicts(model, mesh, gib, loss_chunk, activations, total, fits):
  p = plan.plan(model, plan.parse_mesh(mesh), batch=512, seq=32768, device_memory=gib * GiB, loss_chunk=loss_chunk)
  assert p["bytes"]["activations"] / GiB == pytest.approx(activations, abs=0.06)
  assert p["bytes"]["total"] / GiB == pytest.approx(total, abs=0.06)
  assert p["fits"] == fits and p["verdict"].startswith("fits (" if fits else "does not fit")
  if loss_chunk == 0:  # the whole [32768, vocab] logits: bfloat16 + float32 exp + float32 gradient = 46.4 GiB
    t = zoo.get(model).text
    per_position = t.vocab_size * 10
    assert 32768 * per_position / GiB == pytest.approx(46.4, abs=0.05)
    chunked = plan.plan(model, plan.parse_mesh(mesh), batch=512, seq=32768, device_memory=gib * GiB, loss_chunk=2048)
    # whole logits replace one 2048-position chunk's logits and its chunk-major copy of the hidden states
    extra = p["activations"]["head"] - chunked["activations"]["head"]
    assert extra == (32768 - 2048) * per_position - 32768 * t.hidden_size * 2


def test_241b_on_a_pod_slice():
  """The 241B is planned abstractly (eval_shape, shape arithmetic); its parameter bytes follow the mesh."""
  p = plan.plan("InternVL3.5-241B-A28B", plan.parse_mesh("fsdp:64,expert:8"), **BIG)
  t = zoo.get("InternVL3.5-241B-A28B").text
  experts = t.num_layers * 3 * t.num_experts * t.hidden_size * t.moe_intermediate_size
  # experts shard 512 ways (expert x fsdp), the rest 64 ways (fsdp); a few small vectors are replicated
  assert p["bytes"]["parameters"] == pytest.approx(4 * (experts / 512 + (p["params"] - experts) / 64), rel=1e-3)
  assert p["rows_per_device"] == p["micro_rows_per_device"] == 1 and p["accum"] == 1
  assert not p["fits"] and p["verdict"].startswith("does not fit: needs")
  fits = plan.plan("InternVL3.5-241B-A28B", plan.parse_mesh("fsdp:128,tensor:2,expert:2"), loss_chunk=2048, **BIG)
  assert fits["fits"] and fits["verdict"].startswith("fits (")


def test_moe_paths_follow_dispatch():
  """Without expert parallelism the Pallas path gathers all experts of a layer onto every device; with it
  (when dispatch has it and the 'expert' axis divides the experts) each device sorts its whole expert
  group's tokens into one static buffer: ep x top-k rows per own token."""
  t = zoo.get("InternVL3.5-241B-A28B").text
  kw = dict(loss_chunk=2048, **BIG)
  whole = plan.plan("InternVL3.5-241B-A28B", plan.parse_mesh("fsdp:64"), **kw)
  assert whole["moe_path"] == "pallas"
  experts = 3 * t.num_experts * t.hidden_size * t.moe_intermediate_size * 2  # one layer, bfloat16
  assert whole["activations"]["decoder_layer_work"] > 2 * experts
  ep8 = plan.plan("InternVL3.5-241B-A28B", plan.parse_mesh("fsdp:64,expert:8"), **kw)
  assert ep8["moe_path"] == "expert-parallel"
  routed = 8 * 32768 * t.num_experts_per_tok * (2 * t.hidden_size + 6 * t.moe_intermediate_size) * 2
  assert routed < ep8["activations"]["decoder_layer_work"] < routed + 10 * GiB
  assert plan.plan("InternVL3.5-241B-A28B", plan.parse_mesh("fsdp:64,expert:6"), **{**kw, "batch": 384})[
      "moe_path"] == "pallas"  # 6 does not divide 128 experts


def test_cli_prints_a_verdict_and_json(capsys):
  args = ["--model=InternVL3.5-8B", "--mesh=fsdp:8", "--device-memory=80GiB", "--loss-chunk=2048"]
  plan.main(args)
  out = capsys.readouterr().out
  assert "fits (" in out and "parameters" in out and "optimiser" in out and "mesh fsdp:8" in out
  plan.main(args + ["--json"])
  p = json.loads(capsys.readouterr().out)
  assert p["fits"] and p["mesh"]["fsdp"] == 8 and p["device_memory"] == 80 * GiB
  assert p["bytes"]["total"] == sum(p["bytes"][k] for k in ("parameters", "gradients", "optimizer", "activations"))
  plan.main(["--model=InternVL3.5-8B", "--devices=8", "--device-memory=80GiB", "--loss-chunk=2048", "--recommend"])
  assert "recommended: fsdp:8 (fits" in capsys.readouterr().out


def test_sizes_and_meshes_parse():
  assert plan.parse_size("95GiB") == 95 * 2 ** 30
  assert plan.parse_size("80GB") == 80 * 10 ** 9
  assert plan.parse_size("16 gib") == 16 * 2 ** 30
  assert plan.parse_mesh("fsdp:64,expert:8") == {"data": 1, "fsdp": 64, "tensor": 1, "expert": 8}
  assert plan.parse_mesh("fsdp:-1,tensor:2", devices=16)["fsdp"] == 8


@pytest.mark.parametrize("args,message", [
    (["--model=InternVL3.5-9B", "--mesh=fsdp:8"], "known: InternVL3.5-1B"),
    (["--model=InternVL3.5-8B", "--mesh=pipeline:8"], "unknown mesh axis 'pipeline'"),
    (["--model=InternVL3.5-8B", "--mesh=fsdp:eight"], "needs an integer size"),
    (["--model=InternVL3.5-8B", "--mesh=fsdp:8", "--devices=16"], "--devices says 16"),
    (["--model=InternVL3.5-8B", "--mesh=fsdp:8", "--device-memory=95 parsecs"], "bad size"),
    (["--model=InternVL3.5-8B", "--mesh=fsdp:8", "--accum=3"], "must divide the batch"),
    (["--model=InternVL3.5-8B", "--mesh=fsdp:8", "--seq=4096", "--tiles=96"], "exceed the 4096-token row"),
    (["--model=InternVL3.5-8B", "--mesh=fsdp:8", "--trainable=llm"], "choose from"),
    (["--model=InternVL3.5-8B", "--recommend"], "--recommend needs --devices"),
])
def test_bad_input_is_a_clear_error(capsys, args, message):
  if not any(a.startswith("--device-memory") for a in args):
    args = args + ["--device-memory=80GiB"]
  with pytest.raises(SystemExit) as e:
    plan.main(args)
  assert e.value.code == 2 and message in capsys.readouterr().err
