"""Presets reproduce the paper's Table 1 (rounded to 0.1B) from abstract shapes."""
import json
import subprocess
import sys

import pytest

# name: (vision, language, total) in billions, and the "A" of the MoE models.
TABLE_1 = {
    "InternVL3.5-1B": (0.3, 0.8, 1.1, None),
    "InternVL3.5-2B": (0.3, 2.0, 2.3, None),
    "InternVL3.5-4B": (0.3, 4.4, 4.7, None),
    "InternVL3.5-8B": (0.3, 8.2, 8.5, None),
    "InternVL3.5-14B": (0.3, 14.8, 15.1, None),
    "InternVL3.5-38B": (5.5, 32.8, 38.4, None),
    "InternVL3.5-20B-A4B": (0.3, 20.9, 21.2, 4),
    "InternVL3.5-30B-A3B": (0.3, 30.5, 30.8, 3),
    "InternVL3.5-241B-A28B": (5.5, 235.1, 240.7, 28),
}


@pytest.fixture(scope="module")
def rows():
  out = subprocess.run([sys.executable, "-m", "internvl_jax.zoo", "--json"], check=True, capture_output=True, text=True)
  return {r["name"]: r for r in json.loads(out.stdout)}


def test_json_keys(rows):
  for r in rows.values():
    for key in ("vision_params", "language_params", "total_params", "active_params"):
      assert isinstance(r[key], int) and r[key] > 0


@pytest.mark.parametrize("name", TABLE_1)
def test_table_1(rows, name):
  vision, language, total, active = TABLE_1[name]
  r = rows[name]
  assert round(r["vision_params"] / 1e9, 1) == vision
  assert round(r["language_params"] / 1e9, 1) == language
  assert round(r["total_params"] / 1e9, 1) == total
  if active is None:
    assert r["active_params"] == r["total_params"]
  else:
    # "A4B" etc. are nominal (base LLM's advertised active count + ViT; see zoo.param_counts).
    assert abs(r["active_params"] / 1e9 - active) < 1.0
    assert r["active_params"] < r["total_params"] / 4


def test_table_prints_every_preset():
  out = subprocess.run([sys.executable, "-m", "internvl_jax.zoo"], check=True, capture_output=True, text=True).stdout
  for name in TABLE_1:
    assert name in out
