"""Flash attention kernels (TPU Mosaic and GPU Triton, interpret mode) against the XLA reference:
outputs and gradients, causal and bidirectional, GQA 1/2/8, segment ids (also a query chunk with its own),
window (causal and bidirectional) + sinks, ragged lengths, bfloat16; and lowering for the real platforms."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import BlockSizes, flash_attention, reference_attention

BLOCKS = BlockSizes(16, 16, 16, 16)  # small blocks: several per sequence, ragged tails
CASES = {
    # name: (batch, seq_q, seq_kv, q_heads, kv_heads, head_dim, causal, segments, window, sinks[, scale])
    "causal_gqa2_ragged": (1, 37, 37, 4, 2, 64, True, False, None, False),
    "bidirectional_mha_segments": (2, 24, 24, 2, 2, 64, False, True, None, False),
    "causal_gqa8_d128_scale": (1, 20, 20, 8, 1, 128, True, False, None, False, 0.05),
    "window_sinks_segments": (1, 45, 45, 4, 2, 64, True, True, 9, True),
    "decode_chunk": (1, 5, 29, 2, 1, 64, True, False, None, False),
    "bidirectional_window": (1, 40, 40, 2, 1, 64, False, False, 7, False),
    "chunk_kv_segments": (1, 9, 33, 2, 1, 64, True, True, None, False),  # t != s: kv_segment_ids too
}


def inputs(case, dtype, seed=0):
  b, t, s, n, kv, d, causal, seg, window, sinks = case[:10]
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, t, n, d), (b, s, kv, d), (b, s, kv, d)))
  kw = dict(causal=causal, sliding_window=window, scale=case[10] if len(case) > 10 else None)
  if seg:  # a query chunk (t < s) carries the segment ids of the last t keys
    kv_seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, s)), axis=1), jnp.int32)
    kw["segment_ids"] = kv_seg[:, s - t:]
    if t != s:
      kw["kv_segment_ids"] = kv_seg
  sink = jnp.asarray(rng.standard_normal(n), jnp.float32) if sinks else None
  return (q, k, v, sink), kw


def loop_attention(q, k, v, *, causal, segment_ids=None, kv_segment_ids=None, sliding_window=None, sinks=None,
                   scale=None):
  """The semantics of kernels/flash_attention.py's docstring, one query row at a time in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
  out = np.zeros(q.shape)
  for r in range(b):
    for i in range(t):
      pos = i + s - t  # bottom-right aligned
      keys = [j for j in range(s) if (not causal or j <= pos)
              and (sliding_window is None or (pos - sliding_window < j if causal else abs(pos - j) < sliding_window))
              and (segment_ids is None or int(segment_ids[r, i]) == int(kv_seg[r, j]))]
      for h in range(n):
        if not keys:
          continue
        logits = np.array([q[r, i, h] @ k[r, j, h // (n // kv)] for j in keys]) * scale
        extra = [] if sinks is None else [float(sinks[h])]
        top = max([logits.max(), *extra])
        denom = np.exp(logits - top).sum() + sum(np.exp(x - top) for x in extra)
        out[r, i, h] = sum(np.exp(l - top) / denom * v[r, j, h // (n // kv)] for l, j in zip(logits, keys))
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_the_documented_semantics(name):
  """The XLA reference against a per-row loop over the documented mask (causal alignment, windows,
  segments, GQA, sinks): the kernels are checked against the reference, so its mask is checked here."""
  (q, k, v, sink), kw = inputs(CASES[name], jnp.float32)
  got = np.asarray(reference_attention(q, k, v, sinks=sink, **kw))
  want = loop_attention(q, k, v, sinks=sink, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


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


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bfloat16_gradients(backend):
  """bfloat16 in, bfloat16 gradients out: within 2e-2 (relative to the largest) of float32 on the same
  rounded inputs; window, sinks and segments on so every gradient path is in play."""
  (q, k, v, sink), kw = inputs(CASES["window_sinks_segments"], jnp.bfloat16)
  weight = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  ours = lambda q, k, v, s: flash_attention(q, k, v, sinks=s, backend=backend, interpret=True, block_sizes=BLOCKS,
                                            **kw)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * weight)
  got = jax.grad(loss(ours), (0, 1, 2, 3))(q, k, v, sink)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = jax.grad(loss(lambda q, k, v, s: reference_attention(q, k, v, sinks=s, **kw)), (0, 1, 2, 3))(*f32, sink)
  for g, w in zip(got, want):
    assert g.dtype == (jnp.float32 if g.shape == sink.shape else jnp.bfloat16)
    assert float(jnp.abs(g.astype(jnp.float32) - w).max()) <= 2e-2 * float(jnp.abs(w).max())


# name -> (seq_q, seq_kv, q_heads, kv_heads, head_dim, causal, segments, window, sinks[, block sizes])
LOWERING = {
    "causal": (256, 256, 4, 2, 128, True, False, None, False),
    "segments_kv256": (256, 256, 2, 2, 128, False, True, None, False),  # key blocks of 64 broke Mosaic
    "bidirectional": (256, 256, 2, 1, 64, False, False, None, False),  # dk/dv span was a Python int
    "window_sinks": (256, 256, 4, 2, 64, True, False, 64, True),
    # ragged keys, key blocks of 64 asked for: compiled TPU calls round them up to 128
    "chunk_segments_blocks64": (8, 200, 2, 1, 128, True, True, None, False, BlockSizes(64, 64, 64, 64)),
}


@pytest.mark.parametrize("name", list(LOWERING))
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_lowers_for_its_platform(backend, name, monkeypatch):
  """Forward, dq and dk/dv kernels (default block sizes unless given) lower to a Mosaic / Triton custom call from
  this CPU (the step that enforces Mosaic's block tiling and Triton's op support); the device compile is
  not run. The private entry point skips the platform check that the public one makes."""
  lib = importlib.import_module("kernels.attention.ops")
  tpu_info = importlib.import_module("jax._src.pallas.mosaic.tpu_info")
  # Mosaic asks which TPU it lowers for; answer for the CPU device as if it were a v5e.
  monkeypatch.setitem(tpu_info.registry, "cpu",
                      lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
  t, s, n, kv, d, causal, seg, window, sinks, *blocks = LOWERING[name]
  static = lib.Static(causal, window, d ** -0.5, t, s, backend, False, (blocks or [BlockSizes()])[0], seg, sinks)
  loss = lambda *a: jnp.sum(lib._flash(*a, static).astype(jnp.float32))
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  ids = lambda length: spec(1, length, dtype=jnp.int32) if seg else None
  args = (spec(1, t, n, d), spec(1, s, kv, d), spec(1, s, kv, d), ids(t), ids(s),
          spec(n, dtype=jnp.float32) if sinks else None)
  platform, target = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "__gpu$xla.gpu.triton")}[backend]
  traced = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 5) if sinks else (0, 1, 2))).trace(*args)
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{target}") == 3  # forward, dq, dk/dv


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


@pytest.mark.parametrize("backend", ["reference", "tpu", "gpu"])
def test_argument_errors(backend):
  q = jnp.ones((2, 8, 4, 64))
  call = lambda q, **kw: flash_attention(q, q, q, causal=True, backend=backend, interpret=True, **kw)
  for window in (0, -3, 2.5, True, "8"):
    with pytest.raises(ValueError, match=f"sliding_window must be a positive int, got {window!r}"):
      call(q, sliding_window=window)
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq_q\] = \(2, 8\), got \(2, 7\)"):
    call(q, segment_ids=jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"kv_segment_ids must be \[batch, seq_kv\] = \(2, 8\), got \(8,\)"):
    call(q, segment_ids=jnp.ones((2, 8), jnp.int32), kv_segment_ids=jnp.ones((8,), jnp.int32))


def test_gpu_shape_errors():
  q = jnp.ones((1, 8, 2, 48))
  with pytest.raises(ValueError, match="power-of-two head_dim.*got 48"):
    flash_attention(q, q, q, causal=True, backend="gpu", interpret=True)
  assert flash_attention(q, q, q, causal=True, backend="tpu", interpret=True).shape == q.shape
  with pytest.raises(ValueError, match="powers of two >= 16"):
    flash_attention(q[..., :32], q[..., :32], q[..., :32], causal=True, backend="gpu", interpret=True,
                    block_sizes=BlockSizes(8, 16, 16, 16))
  with pytest.raises(ValueError, match="multiples of 8"):
    flash_attention(q, q, q, causal=True, backend="tpu", interpret=True, block_sizes=BlockSizes(12, 16, 16, 16))
