"""Training labels: the ignored-position value and the loss-weight rule, shared by the processor (which writes
labels and weights), the data pipeline (which pads them) and the losses (which skip ignored positions).

Square averaging (REFERENCE.md §6.1, paper §2.2): a sample with N supervised tokens weighs each of them
1/sqrt(N) — between token averaging (1 per token: long replies dominate) and sample averaging (1/N: every
sample counts the same) — and the SFT loss divides by the sum of the weights over the batch.
"""
from __future__ import annotations

import math

import numpy as np

IGNORE = -100  # a label position that is not supervised (prompt, template markers, padding)


def loss_weights(labels: np.ndarray) -> np.ndarray:
  """Square averaging: 1/sqrt(N) on each of the sample's N supervised tokens, 0 elsewhere. labels [L] -> [L]
  float32."""
  n = int(np.sum(labels != IGNORE))
  return np.where(labels != IGNORE, 1.0 / math.sqrt(n) if n else 0.0, 0.0).astype(np.float32)
