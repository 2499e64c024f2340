"""Kernel dispatch: the whole model with the Pallas kernels (interpret mode; TPU and GPU) equals the XLA
path, on one device and per shard under an 8-device Mesh; impossible requests are clear errors."""
import jax
import numpy as np
import pytest

import internvl_jax as ij
from internvl_jax import dispatch, sharding, zoo
from conftest import make_batch


@pytest.fixture(scope="module")
def build():
  """interpret backend -> (XLA model, the same weights with the Pallas kernels), built once per module."""
  from flax import nnx
  cfg = zoo.get("tiny-moe").replace(attention_impl="xla", moe_impl="xla")
  xla = ij.init_model(cfg, seed=7)
  cache = {}

  def get(interpret: str):
    if interpret not in cache:
      pallas = ij.InternVL(cfg.replace(attention_impl="pallas", moe_impl="pallas", pallas_interpret=interpret),
                           rngs=nnx.Rngs(0))
      nnx.update(pallas, nnx.state(xla))  # same weights, other kernels
      cache[interpret] = xla, pallas
    return cache[interpret]

  return get


@pytest.fixture(scope="module")
def models(build):
  return build("tpu")


@pytest.mark.parametrize("interpret", ["tpu", "gpu"])
def test_pallas_model_equals_xla(build, interpret):
  xla, pallas = build(interpret)
  ids, mask, pixels = make_batch(seed=8)
  want = np.asarray(ij.forward(xla, ids, pixels, mask))
  got = np.asarray(ij.forward(pallas, ids, pixels, mask))
  valid = mask.astype(bool)  # padding rows differ by design (see kernels/flash_attention.py)
  assert np.abs(got[valid] - want[valid]).max() <= 1e-5 * np.abs(want[valid]).max()


def test_pallas_model_per_shard_under_a_mesh(models):
  xla, pallas = models
  ids, mask, pixels = make_batch(seed=9)
  want = np.asarray(ij.forward(xla, ids, pixels, mask))
  mesh = sharding.make_mesh({"data": 2, "tensor": 2, "fsdp": 2})
  with jax.set_mesh(mesh):
    got = np.asarray(ij.forward(pallas, ids, pixels, mask))
  valid = mask.astype(bool)
  assert np.abs(got[valid] - want[valid]).max() <= 1e-5 * np.abs(want[valid]).max()


def test_pallas_model_expert_parallel(models):
  """Experts split over 'expert' (4 shards of the 4 experts), the Pallas gmm per shard."""
  xla, pallas = models
  ids, mask, pixels = make_batch(seed=10)
  want = np.asarray(ij.forward(xla, ids, pixels, mask))
  with jax.set_mesh(sharding.make_mesh({"expert": 4, "fsdp": 2})):
    got = np.asarray(ij.forward(pallas, ids, pixels, mask))
  valid = mask.astype(bool)
  assert np.abs(got[valid] - want[valid]).max() <= 1e-5 * np.abs(want[valid]).max()


def test_resolution_and_errors():
  assert dispatch.resolve("auto", None, allowed=("auto", "xla", "pallas")) == "xla"  # CPU
  assert dispatch.resolve("auto", "gpu", allowed=("auto", "xla", "pallas")) == "pallas"
  with pytest.raises(ValueError, match="Pallas kernels need a TPU or GPU"):
    dispatch.resolve("pallas", None, allowed=("auto", "xla", "pallas"))
  with pytest.raises(ValueError, match="cudnn' needs a GPU"):
    dispatch.resolve("cudnn", None, allowed=("auto", "xla", "pallas", "cudnn"))
  with pytest.raises(ValueError, match="unknown implementation"):
    dispatch.resolve("triton", None, allowed=("auto", "xla", "pallas"))
