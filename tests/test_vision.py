"""Pixel shuffle ('v2'), bicubic position-embedding interpolation, drop path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import internvl_jax as ij
from internvl_jax.model.intern_vit import bicubic_matrix, drop_path
from internvl_jax.model.pixel_shuffle import pixel_shuffle
from test_parity import close


def torch_pixel_shuffle_v2(x, scale):
  """The InternVL remote code's view/permute sequence (REFERENCE.md §2.3), verbatim in torch."""
  n, w, h, c = x.size()
  x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
  x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
  return x.permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize("scale,grid", [(0.5, 32), (0.25, 32), (0.5, 4), (0.25, 8)])
def test_pixel_shuffle_matches_reference(scale, grid):
  x = np.random.RandomState(0).randn(3, grid, grid, 5).astype(np.float32)
  ref = torch_pixel_shuffle_v2(torch.tensor(x), scale).numpy()
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), scale)), ref)


def numpy_pixel_shuffle_v2(x, scale):
  """The same official view/permute sequence (REFERENCE.md §2.3) transcribed in numpy; numpy's reshape of a
  transposed array copies in C order, as torch's `.contiguous().view` does."""
  n, w, h, c = x.shape
  x = x.reshape(n, w, int(h * scale), int(c / scale)).transpose(0, 2, 1, 3)
  x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
  return x.transpose(0, 2, 1, 3)  # ps_version 'v2'


@pytest.mark.parametrize("scale,shape", [(0.5, (2, 6, 10, 3)), (0.5, (1, 4, 2, 7)), (0.25, (3, 8, 12, 5)),
                                         (0.25, (1, 4, 16, 2))])
def test_pixel_shuffle_matches_numpy_reference_non_square(scale, shape):
  x = np.random.RandomState(2).randn(*shape).astype(np.float32)
  ref = numpy_pixel_shuffle_v2(x, scale)
  out = np.asarray(pixel_shuffle(jnp.asarray(x), scale))
  r = int(1 / scale)
  assert out.shape == ref.shape == (shape[0], shape[1] // r, shape[2] // r, shape[3] * r * r)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(out, np.asarray(pixel_shuffle(x, scale)))  # numpy input, same result


def test_pixel_shuffle_neighbourhood_layout():
  """output[i, j] = concat over (dr, dc) of x[2i+dr, 2j+dc] (REFERENCE.md §2.3)."""
  x = np.random.RandomState(1).randn(1, 4, 4, 3).astype(np.float32)
  out = np.asarray(pixel_shuffle(jnp.asarray(x), 0.5))
  for i in range(2):
    for j in range(2):
      want = np.concatenate([x[0, 2 * i + dr, 2 * j + dc] for dr in range(2) for dc in range(2)])
      np.testing.assert_array_equal(out[0, i, j], want)


def test_pixel_shuffle_rejects_bad_grid():
  with pytest.raises(ValueError, match="grid"):
    pixel_shuffle(jnp.zeros((1, 6, 6, 2)), 0.25)


@pytest.mark.parametrize("n_in,n_out", [(32, 16), (4, 6), (4, 7), (32, 32)])
def test_bicubic_matches_torch(n_in, n_out):
  x = np.random.RandomState(2).randn(1, 3, n_in, n_in).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.tensor(x), size=(n_out, n_out), mode="bicubic",
                                        align_corners=False).numpy()
  m = bicubic_matrix(n_in, n_out)
  ours = np.einsum("hi,ncij,wj->nchw", m, x, m)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_position_interpolation_against_transformers(hf_checkpoint):
  """84 px tiles on a 56 px model: transformers and we both interpolate the 4x4 grid to 6x6."""
  path, hf = hf_checkpoint("dense")
  pixels = np.random.RandomState(3).randn(2, 84, 84, 3).astype(np.float32)
  with torch.no_grad():
    ref = hf.model.vision_tower(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  close(ij.from_pretrained(path).vision_model(pixels), ref, "InternViT at 84 px")


def test_drop_path_statistics():
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
  kept = y[:, 0, 0] != 0
  assert np.all(y[kept] == pytest.approx(1 / 0.75)) and np.all(y[~kept] == 0)
  assert abs(kept.mean() - 0.75) < 0.03


def test_drop_path_only_in_training(hf_checkpoint):
  from flax import nnx
  path, _ = hf_checkpoint("dense")
  model = ij.from_pretrained(path)
  pixels = np.random.RandomState(4).randn(8, 56, 56, 3).astype(np.float32)
  base = np.asarray(model.vision_model(pixels))
  # the checkpoint's rate is 0: rngs change nothing; with a rate, rngs turn drop path on
  np.testing.assert_array_equal(np.asarray(model.vision_model(pixels, rngs=nnx.Rngs(dropout=0))), base)
  for layer in model.vision_model.layers:
    layer.drop_rate = 0.5
  np.testing.assert_array_equal(np.asarray(model.vision_model(pixels)), base)
  assert not np.allclose(np.asarray(model.vision_model(pixels, rngs=nnx.Rngs(dropout=0))), base)
