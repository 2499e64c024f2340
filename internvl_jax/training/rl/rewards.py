"""Rewards for Cascade RL rollouts, and the accuracy filter that picks the online prompts.

A reward is a plain function `(completion text, reference answer) -> float`; `REWARDS` names the built-in
ones so configs can choose them by name, and any other function with that signature plugs in the same way.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from internvl_jax.training.evaluation import final_answer
from internvl_jax.inference.chat import split_thinking

Reward = Callable[[str, str], float]

_THINK = re.compile(r"\s*<think>(.*?)</think>\s*(\S.*)", re.DOTALL)


def accuracy_reward(completion: str, reference: str) -> float:
  """1.0 when the completion's final answer equals the reference's, else 0.0. The answer is read after the
  `</think>` section (its draft numbers must not count) and compared by `evaluation.final_answer`: the last `\\boxed{}`,
  a number after "Answer:", the last number, or a lone multiple-choice letter."""
  return float(final_answer(split_thinking(completion)[1], reference))


def format_reward(completion: str, reference: str = "") -> float:
  """Thinking mode's format: 1.0 for one non-empty `<think>...</think>` section at the start followed by a
  non-empty answer with no further think tags, else 0.0. The reference is not used."""
  m = _THINK.fullmatch(completion)
  if not m or not m.group(1).strip():
    return 0.0
  return float("<think>" not in m.group(2) and "</think>" not in m.group(2))


REWARDS: dict[str, Reward] = {"accuracy": accuracy_reward, "format": format_reward}


def score(completions: Sequence[str], references: Sequence[str], weights: dict[str, float]) -> np.ndarray:
  """Σ_name weight · REWARDS[name](completion, reference) per completion -> float32 [len(completions)]."""
  unknown = sorted(set(weights) - set(REWARDS))
  if unknown:
    raise ValueError(f"unknown rewards {unknown}; known: {sorted(REWARDS)}")
  if len(completions) != len(references):
    raise ValueError(f"{len(completions)} completions for {len(references)} references")
  return np.asarray([sum(w * REWARDS[name](c, r) for name, w in weights.items())
                     for c, r in zip(completions, references)], np.float32)


def select_prompts(correct, low: float = 0.2, high: float = 0.8):
  """The online-data filter (MMPR-Tiny): keep prompts whose rollout accuracy lies in [low, high].

  correct [prompts, G] (1 = the rollout's answer was right) -> (indices kept, accuracy [prompts]). Prompts
  the model always or never solves give every rollout the same reward, a zero group advantage, and so no
  gradient; they only cost rollout time."""
  acc = np.asarray(correct, np.float32).mean(axis=1)
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
  return np.flatnonzero((acc >= low) & (acc <= high)), acc
