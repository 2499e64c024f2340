"""Kernel dispatch: the whole model with the Pallas kernels (interpret mode; TPU and GPU) equals the XLA
path, on one device and per shard under an 8-device Mesh; impossible requests are clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import internvl_jax as ij
from internvl_jax import sharding, zoo
from internvl_jax.model import attention, backend
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
  assert backend.resolve("auto", None, allowed=("auto", "xla", "pallas")) == "xla"  # CPU
  assert backend.resolve("auto", "gpu", allowed=("auto", "xla", "pallas")) == "pallas"
  with pytest.raises(ValueError, match="Pallas kernels need a TPU or GPU"):
    backend.resolve("pallas", None, allowed=("auto", "xla", "pallas"))
  with pytest.raises(ValueError, match="cudnn' needs a GPU"):
    backend.resolve("cudnn", None, allowed=("auto", "xla", "pallas", "cudnn"))
  with pytest.raises(ValueError, match="unknown implementation"):
    backend.resolve("triton", None, allowed=("auto", "xla", "pallas"))


@pytest.mark.parametrize("causal", [False, True])
def test_headwise_attention_equals_batched(causal):
  """The CPU's per-(row, kv head) attention gives the batched form's result: GQA, a padded row (whose
  queries see nothing valid), float32 within 1e-5 and bfloat16 within 2e-2."""
  from einops import rearrange
  decoder_mask = lambda seg, causal: attention.attention_mask(seg, t, t, causal=causal)
  cache_layout = lambda q, k, v: (q, rearrange(k, "b s k h -> b k h s"), rearrange(v, "b s k h -> b k s h"))
  masked_attention = lambda q, k, v, mask, scale=None: attention._grouped(*cache_layout(q, k, v), mask,
                                                                           scale or h ** -0.5)
  headwise_attention = lambda q, k, v, mask, scale=None: attention._headwise(*cache_layout(q, k, v), mask,
                                                                             scale or h ** -0.5)
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 37, 8, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  seg = np.ones((b, t), np.int32)
  seg[1, 30:] = 0
  mask = decoder_mask(jnp.asarray(seg), causal)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    args = [x.astype(dtype) for x in (q, k, v)]
    want = np.asarray(masked_attention(*args, mask), np.float32)
    got = np.asarray(jax.jit(headwise_attention)(*args, mask), np.float32)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  np.testing.assert_allclose(headwise_attention(q, k, v, None, scale=0.3), masked_attention(q, k, v, None, scale=0.3),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_with_sliding_window_and_sinks_equals_reference(causal):
  """`attention.attention` (what GPT-OSS calls) with a sliding window, per-head sinks and packed segments:
  the XLA path and the Pallas kernel (interpret mode, reached through the same call) both equal
  `kernels.reference_attention`, on the tokens of real segments."""
  import kernels
  from internvl_jax.config import KernelConfig
  rng = np.random.default_rng(3)
  b, t, n, kv, h = 2, 40, 4, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  sinks = jnp.asarray(rng.standard_normal(n), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, 25:] = 2
  seg[1, 33:] = 0
  seg = jnp.asarray(seg)
  kw = dict(causal=causal, segment_ids=seg, sliding_window=8, sinks=sinks)
  want = np.asarray(kernels.reference_attention(q, k, v, **kw))
  real = np.asarray(seg) != 0
  for cfg in (KernelConfig(attention="xla"), KernelConfig(attention="pallas", interpret="tpu")):
    got = np.asarray(jax.jit(lambda q, k, v: attention.attention(q, k, v, kernels_cfg=cfg, **kw))(q, k, v))
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=2e-5, err_msg=str(cfg))
  no_sink = np.asarray(attention.attention(q, k, v, causal=causal, segment_ids=seg, sliding_window=8,
                                           kernels_cfg=KernelConfig(attention="xla")))
  assert np.abs(no_sink[real] - want[real]).max() > 1e-3  # the sinks change the result
