"""Flash attention kernels (TPU Mosaic and GPU Triton, interpret mode) against the XLA reference:
outputs and gradients, causal and bidirectional, GQA 1/2/8, segment ids, window + sinks, ragged lengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.flash_attention import BlockSizes, flash_attention, reference_attention

BLOCKS = BlockSizes(16, 16, 16, 16)  # small blocks: several per sequence, ragged tails
CASES = {
    # name: (batch, seq_q, seq_kv, q_heads, kv_heads, head_dim, causal, segments, window, sinks[, scale])
    "causal_gqa2_ragged": (1, 37, 37, 4, 2, 64, True, False, None, False),
    "bidirectional_mha_segments": (2, 24, 24, 2, 2, 64, False, True, None, False),
    "causal_gqa8_d128_scale": (1, 20, 20, 8, 1, 128, True, False, None, False, 0.05),
    "window_sinks_segments": (1, 45, 45, 4, 2, 64, True, True, 9, True),
    "decode_chunk": (1, 5, 29, 2, 1, 64, True, False, None, False),
}


def inputs(case, dtype, seed=0):
  b, t, s, n, kv, d, causal, seg, window, sinks = case[:10]
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, t, n, d), (b, s, kv, d), (b, s, kv, d)))
  kw = dict(causal=causal, sliding_window=window, scale=case[10] if len(case) > 10 else None)
  if seg:
    kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
  sink = jnp.asarray(rng.standard_normal(n), jnp.float32) if sinks else None
  return (q, k, v, sink), kw


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(backend, name):
  (q, k, v, sink), kw = inputs(CASES[name], jnp.float32)
  ours = lambda q, k, v, s: flash_attention(q, k, v, sinks=s, backend=backend, interpret=True, block_sizes=BLOCKS, **kw)
  ref = lambda q, k, v, s: reference_attention(q, k, v, sinks=s, **kw)
  weight = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  args = (q, k, v, sink)
  argnums = (0, 1, 2, 3) if sink is not None else (0, 1, 2)
  for got, want in zip(jax.value_and_grad(lambda *a: jnp.sum(ours(*a) * weight), argnums)(*args)[1],
                       jax.value_and_grad(lambda *a: jnp.sum(ref(*a) * weight), argnums)(*args)[1]):
    assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())
  got, want = ours(*args), ref(*args)
  assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bfloat16(backend):
  (q, k, v, sink), kw = inputs(CASES["window_sinks_segments"], jnp.bfloat16)
  got = flash_attention(q, k, v, sinks=sink, backend=backend, interpret=True, block_sizes=BLOCKS, **kw)
  want = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), sinks=sink, **kw)
  assert got.dtype == jnp.bfloat16
  assert float(jnp.abs(got.astype(jnp.float32) - want).max()) <= 2e-2 * float(jnp.abs(want).max())


def test_sink_semantics():
  """With sinks the softmax denominator gains exp(sink); a huge sink drives the output to zero."""
  (q, k, v, _), kw = inputs(CASES["causal_gqa2_ragged"], jnp.float32)
  plain = reference_attention(q, k, v, **kw)
  assert np.allclose(reference_attention(q, k, v, sinks=jnp.full((4,), -1e4), **kw), plain, atol=1e-6)
  assert float(jnp.abs(reference_attention(q, k, v, sinks=jnp.full((4,), 1e4), **kw)).max()) < 1e-6


def test_fully_masked_rows_are_zero_not_nan():
  q = jnp.ones((1, 4, 2, 64))
  seg_q = jnp.array([[1, 1, 2, 2]])
  out = flash_attention(q, q, q, causal=True, segment_ids=seg_q, kv_segment_ids=jnp.array([[1, 1, 1, 1]]),
                        backend="tpu", interpret=True, block_sizes=BLOCKS)
  assert not np.isnan(np.asarray(out)).any() and np.all(np.asarray(out)[0, 2:] == 0)


def test_errors():
  q = jnp.ones((1, 8, 4, 64))
  with pytest.raises(ValueError, match="cannot run on the cpu backend"):
    flash_attention(q, q, q, causal=True, backend="tpu")
  with pytest.raises(ValueError, match="n % kv"):
    flash_attention(q, jnp.ones((1, 8, 3, 64)), jnp.ones((1, 8, 3, 64)), causal=True)
  with pytest.raises(ValueError, match="unknown backend"):
    flash_attention(q, q, q, causal=True, backend="cuda")
  assert flash_attention(q, q, q, causal=True).shape == q.shape  # auto on the CPU: the reference
