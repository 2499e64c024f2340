"""Grouped matmul kernels (kernels/gmm.py) in interpret mode against jax.lax.ragged_dot.

Tiny tiles (8 rows for Mosaic, 16 for Triton, whose dots need 16; 16 columns) so that row tiles straddle
groups and m, k, n are not multiples of the tile.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gmm import GmmBlockSizes, gmm, tgmm

BACKENDS = ("tpu", "gpu")
BLOCKS = {"tpu": GmmBlockSizes(tm=8, tk=16, tn=16), "gpu": GmmBlockSizes(tm=16, tk=16, tn=16)}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# name -> (m, k, n, group_sizes)
CASES = {
    "uneven": (40, 24, 20, [7, 3, 12, 1, 17]),
    "empty_groups": (48, 32, 16, [0, 11, 0, 20, 17, 0]),  # first, middle and last empty
    "one_group": (40, 16, 24, [0, 0, 40, 0]),
    "rows_past_sum": (56, 40, 36, [9, 0, 14, 6]),  # rows 29.. belong to no group
    "all_empty": (24, 16, 16, [0, 0, 0, 0]),
}


def _data(m, k, n, sizes, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  lhs = jnp.asarray(rng.randn(m, k), dtype)
  rhs = jnp.asarray(rng.randn(len(sizes), k, n) / np.sqrt(k), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _assert_close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  scale = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max()) / scale
  assert err <= tol, f"max error {err:.3g} (relative to max |ref| {scale:.3g}) > {tol}"


def _ref_gmm(lhs, rhs, gs):
  return jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_float32(backend, case):
  m, k, n, sizes = CASES[case]
  lhs, rhs, gs = _data(m, k, n, sizes)
  out = gmm(lhs, rhs, gs, backend=backend, interpret=True, block_sizes=BLOCKS[backend])
  assert out.dtype == jnp.float32
  _assert_close(out, _ref_gmm(lhs, rhs, gs), TOL[jnp.float32])
  used = sum(sizes)
  assert not np.any(np.asarray(out[used:])), "rows past sum(group_sizes) must be zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_bfloat16(backend):
  lhs, rhs, gs = _data(*CASES["empty_groups"], dtype=jnp.bfloat16)
  out = gmm(lhs, rhs, gs, backend=backend, interpret=True, block_sizes=BLOCKS[backend])
  assert out.dtype == jnp.bfloat16
  _assert_close(out, _ref_gmm(lhs, rhs, gs), TOL[jnp.bfloat16])
  wide = gmm(lhs, rhs, gs, backend=backend, interpret=True, block_sizes=BLOCKS[backend],
             preferred_element_type=jnp.float32)
  assert wide.dtype == jnp.float32
  _assert_close(wide, _ref_gmm(lhs, rhs, gs), 1e-5)  # f32 accumulation of exact bf16 products


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_sizes_are_traced(backend):
  """One compilation serves any group sizes: the visit list is built from the traced sizes."""
  lhs, rhs, _ = _data(*CASES["uneven"])
  f = jax.jit(lambda a, b, g: gmm(a, b, g, backend=backend, interpret=True, block_sizes=BLOCKS[backend]))
  for sizes in ([7, 3, 12, 1, 17], [0, 25, 0, 0, 9], [40, 0, 0, 0, 0]):
    gs = jnp.asarray(sizes, jnp.int32)
    _assert_close(f(lhs, rhs, gs), _ref_gmm(lhs, rhs, gs), TOL[jnp.float32])


@pytest.mark.parametrize("case,dtype", [("uneven", jnp.float32), ("rows_past_sum", jnp.float32),
                                        ("empty_groups", jnp.bfloat16)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend, case, dtype):
  m, k, n, sizes = CASES[case]
  lhs, rhs, gs = _data(m, k, n, sizes, dtype=dtype)
  w = jnp.asarray(np.random.RandomState(1).randn(m, n), jnp.float32)

  def loss(impl):
    return lambda a, b: jnp.sum(jnp.sin(impl(a, b).astype(jnp.float32)) * w)

  kernel = lambda a, b: gmm(a, b, gs, backend=backend, interpret=True, block_sizes=BLOCKS[backend])
  reference = lambda a, b: jax.lax.ragged_dot(a, b, gs, preferred_element_type=jnp.float32).astype(a.dtype)
  dlhs, drhs = jax.grad(loss(kernel), (0, 1))(lhs, rhs)
  # The reference gradient is taken in f32 so that it is the accurate one.
  up = lambda x: x.astype(jnp.float32)
  rlhs, rrhs = jax.grad(loss(reference), (0, 1))(up(lhs), up(rhs))
  assert dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype
  _assert_close(dlhs, rlhs, TOL[dtype])
  _assert_close(drhs, rrhs, TOL[dtype])
  assert not np.any(np.asarray(dlhs[sum(sizes):], np.float32)), "rows past the sum get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm(backend):
  m, k, n, sizes = 56, 24, 20, [0, 9, 0, 20, 6, 0]  # empty first/middle/last groups, rows 35.. unused
  rng = np.random.RandomState(2)
  lhs = jnp.asarray(rng.randn(m, k), jnp.float32)
  dout = jnp.asarray(rng.randn(m, n), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  out = tgmm(lhs, dout, gs, backend=backend, interpret=True, block_sizes=BLOCKS[backend])
  # Explicit per-group reference, independent of ragged_dot_general.
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  want = np.stack([np.asarray(lhs[a:b]).T @ np.asarray(dout[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
  assert out.shape == (len(sizes), k, n)
  _assert_close(out, want, TOL[jnp.float32])
  _assert_close(tgmm(lhs, dout, gs), want, TOL[jnp.float32])  # the reference backend agrees
  for g, size in enumerate(sizes):
    if size == 0:
      assert not np.any(np.asarray(out[g])), f"empty group {g} must get a zero gradient"


@pytest.mark.parametrize("for_tgmm", [False, True])
def test_visit_list(for_tgmm):
  """Each row of a group is owned by exactly one visit of its tile; the list is in order and fits the
  static bound; gmm visits every row tile, tgmm every group."""
  visits = importlib.import_module("kernels.gmm.common")._visits
  rng = np.random.RandomState(3)
  tm, num_tiles = 8, 7
  m = tm * num_tiles - 3
  for _ in range(20):
    sizes = rng.multinomial(rng.randint(0, m + 1), np.ones(5) / 5) * (rng.rand(5) < 0.7)
    tile, group, lo, hi = (np.asarray(a) for a in visits(jnp.asarray(sizes, jnp.int32), m, tm * num_tiles, tm,
                                                          for_tgmm=for_tgmm))
    assert len(tile) == num_tiles + len(sizes) - 1
    assert np.all(np.diff(tile) >= 0) and np.all(np.diff(group) >= 0)
    owners = np.zeros(tm * num_tiles, int)
    for t, a, b in zip(tile, lo, hi):
      rows = np.arange(t * tm, (t + 1) * tm)
      owners[rows[(rows >= a) & (rows < b)]] += 1
    used = sizes.sum()
    assert np.all(owners[:used] == 1) and np.all(owners[used:] == 0)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for t, g, a, b in zip(tile, group, lo, hi):
      assert (a, b) in ((0, 0), (bounds[g], bounds[g + 1]))
    if for_tgmm:
      assert set(group) == set(range(len(sizes)))
    else:
      assert set(tile) == set(range(num_tiles))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lowers_for_its_platform(backend, dtype):
  """Forward and backward kernels, default tiles, lower to a Mosaic / Triton custom call from this CPU (the
  step that rejects unsupported ops and non-power-of-two Triton shapes); the device compile is not run. The
  private entry point skips the platform check that the public one makes."""
  gmm_lib = importlib.import_module("kernels.gmm.ops")
  static = gmm_lib._static(backend, False, None, dtype)
  loss = lambda a, b, g: jnp.sum(gmm_lib._gmm_vjp(a, b, g, static).astype(jnp.float32))
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  platform, target = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "__gpu$xla.gpu.triton")}[backend]
  traced = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(spec(500, 200), spec(4, 200, 300),
                                                          jax.ShapeDtypeStruct((4,), jnp.int32))
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{target}") == 3  # gmm, gmm with rhs^T, tgmm


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the error raised on the CPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_kernel_on_cpu_raises(backend):
  lhs, rhs, gs = _data(*CASES["uneven"])
  with pytest.raises(ValueError, match=backend):
    gmm(lhs, rhs, gs, backend=backend)
  with pytest.raises(ValueError, match=backend):
    tgmm(lhs, lhs, gs, backend=backend)
