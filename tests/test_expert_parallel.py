"""Expert parallelism (moe.moe_expert_parallel): on 8 simulated devices the MoE layer with its experts
sharded over 'expert' equals the unsharded layer (outputs, load-balancing loss, gradients w.r.t. inputs and
every weight), the grouped matmul runs per shard (Pallas in interpret mode), the expert weights really are
split, and the whole tiny-moe model under such a mesh equals one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import internvl_jax as ij
from internvl_jax import sharding, zoo
from internvl_jax.model import moe
from internvl_jax.config import KernelConfig, TextConfig
from conftest import make_batch

# 8 experts so that an 'expert' axis of 8 shards them too; k = 2; unnormalised top-k weights.
CFG = TextConfig(arch="qwen3_moe", hidden_size=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                 norm_topk_prob=False)
MESHES = [{"expert": 8}, {"expert": 4, "fsdp": 2}, {"expert": 2, "fsdp": 2, "tensor": 2}]


def layer_grads(mesh, impl="xla", interpret=None, shape=(4, 6), jaxpr=False):
  """(loss, aux loss, y, d state, d x) of sum(y * r) + load-balancing loss; or the jaxpr of its gradient."""
  layer = moe.MoE(CFG, param_dtype=jnp.float32, kernels_cfg=KernelConfig(moe=impl, interpret=interpret), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (*shape, CFG.hidden_size))
  r = jax.random.normal(jax.random.key(2), x.shape)
  valid = jnp.ones(shape, bool).at[0, :2].set(False)  # padding must stay out of the balance statistics

  def loss(state, x):
    y, stats = nnx.merge(graphdef, state)(x, valid)
    aux = moe.load_balancing_loss(*stats)
    return jnp.sum(y * r) + aux, (aux, y)

  fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  # Results are awaited: TPU interpret mode runs its callbacks' jnp ops on CPU device 0, so an op queued
  # there behind a still-running sharded kernel (e.g. the next call's eager init) would deadlock.
  if mesh is None:
    return jax.block_until_ready(jax.jit(fn)(state, x))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    return jax.make_jaxpr(fn)(state, x) if jaxpr else jax.block_until_ready(jax.jit(fn)(state, x))


def assert_close(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (jit, custom_vjp, shard_map)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from eqns(sub)


def expert_shard_map(closed):
  """The shard_map equation of the expert-parallel layer in a traced program (the one using the expert index)."""
  found = [e for e in eqns(closed.jaxpr) if e.primitive.name == "shard_map"
           and any(x.primitive.name == "axis_index" for x in eqns(e.params["jaxpr"]))]
  assert found, "the MoE layer did not run expert-parallel"
  return found[0]


def pallas_names(jaxpr):
  return [e.params["name"] for e in eqns(jaxpr) if e.primitive.name == "pallas_call"]


@pytest.fixture(scope="module")
def reference():
  cache = {}
  return lambda shape: cache.setdefault(shape, layer_grads(None, shape=shape))


# (4, 6): 24 tokens split over every batch axis (all-gather + psum_scatter over 'expert');
# (2, 5): 10 tokens do not split over 'expert', so each expert shard holds them whole (psum).
@pytest.mark.parametrize("shape", [(4, 6), (2, 5)])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_layer_and_gradients_equal_unsharded(reference, mesh_shape, shape):
  mesh = sharding.make_mesh(mesh_shape)
  got = layer_grads(mesh, shape=shape)
  assert_close(got, reference(shape))
  (_, (aux, _)), _ = got
  assert float(aux) > 0
  sm = expert_shard_map(layer_grads(mesh, shape=shape, jaxpr=True))  # the forward's
  ep = mesh_shape["expert"]
  gate = sm.params["jaxpr"].invars[3].aval.shape
  assert gate[0] == CFG.num_experts // ep  # each shard computes with its E/ep experts only
  assert gate[2] == CFG.moe_intermediate_size // mesh_shape.get("tensor", 1)
  names = {e.primitive.name for e in eqns(sm.params["jaxpr"])}
  assert ("all_gather" in names and "reduce_scatter" in names) == (shape == (4, 6))


@pytest.mark.parametrize("interpret,mesh_shape", [("tpu", {"expert": 2, "fsdp": 2, "tensor": 2}),
                                                  ("gpu", {"expert": 8})])
def test_pallas_gmm_runs_per_expert_shard(reference, interpret, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  assert_close(layer_grads(mesh, "pallas", interpret), reference((4, 6)))
  program = layer_grads(mesh, "pallas", interpret, jaxpr=True)
  inside = [n for e in eqns(program.jaxpr) if e.primitive.name == "shard_map" for n in pallas_names(e.params["jaxpr"])]
  kernels = ("gmm_tpu", "tgmm_tpu") if interpret == "tpu" else ("gmm_triton", "tgmm_triton")
  # The forward's three gmm and the backward's gmm (d lhs) and tgmm (d weights) all run per shard ...
  assert inside.count(kernels[0]) == 3 + 3 and inside.count(kernels[1]) == 3
  # ... and no kernel runs outside the shard_map.
  assert len(pallas_names(program.jaxpr)) == len(inside)

def test_expert_weights_are_sharded():
  mesh = sharding.make_mesh({"expert": 4, "fsdp": 2})
  model = ij.init_model(zoo.get("tiny-moe"), mesh=mesh)
  e = zoo.get("tiny-moe").text.num_experts
  for name in ("gate", "up", "down"):
    w = getattr(model.language_model.layers[0].mlp, name)[...]
    assert w.sharding.spec[0] == "expert"
    assert {s.data.shape[0] for s in w.addressable_shards} == {e // 4}
    assert len({s.index[0].start for s in w.addressable_shards}) == 4  # four different slices of the experts
  with jax.set_mesh(mesh):
    assert moe.expert_parallel_size(e) == 4
  with jax.set_mesh(sharding.make_mesh({"expert": 8})):
    assert moe.expert_parallel_size(e) == 1  # 8 shards cannot split 4 experts: the token-sharded path


@pytest.mark.parametrize("mesh_shape", [{"expert": 4, "fsdp": 2}, {"expert": 2, "data": 2, "tensor": 2}])
def test_model_logits_with_expert_axis_equal_one_device(mesh_shape):
  cfg = zoo.get("tiny-moe")
  ids, mask, pixels = make_batch(seed=11)
  want, aux_want = ij.forward(ij.init_model(cfg, seed=4), ids, pixels, mask, return_aux=True)
  mesh = sharding.make_mesh(mesh_shape)
  sharded = ij.init_model(cfg, seed=4, mesh=mesh)
  with jax.set_mesh(mesh):
    got, aux = ij.forward(sharded, ids, pixels, mask, return_aux=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux["moe_aux_loss"]), float(aux_want["moe_aux_loss"]), rtol=1e-5)
