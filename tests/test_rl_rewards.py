"""Rollout rewards and the [low, high] accuracy filter (specification: REFERENCE.md §6.5, issue 8)."""
import numpy as np
import pytest

from internvl_jax.training.rl import rewards


@pytest.mark.parametrize("completion, reference, want", [
    ("The sum is \\boxed{12}.", "12", 1.0),
    ("3 + 9 = 12, so the answer is 12", "12", 1.0),
    ("Answer: 7", "The answer is 8.", 0.0),
    ("<think>maybe 5? no, 3 + 4</think>\nThe answer is 7.", "7", 1.0),
    ("<think>it is 7</think>\nThe answer is 5.", "7", 0.0),  # the draft inside <think> does not count
    ("(B)", "B", 1.0),
    ("I cannot tell.", "4", 0.0),
])
def test_accuracy_reward(completion, reference, want):
  assert rewards.accuracy_reward(completion, reference) == want


@pytest.mark.parametrize("completion, want", [
    ("<think>3 + 4 = 7</think>\n\nThe answer is 7.", 1.0),
    ("The answer is 7.", 0.0),                                   # no thinking section
    ("<think> </think>The answer is 7.", 0.0),                  # empty thinking
    ("<think>3 + 4</think>", 0.0),                              # no answer after it
    ("<think>a</think> 7 <think>b</think> 7", 0.0),              # a second section
    ("Sure. <think>a</think> 7", 0.0),                           # not at the start
])
def test_format_reward(completion, want):
  assert rewards.format_reward(completion) == want


def test_score_weights_rewards_and_rejects_bad_input():
  got = rewards.score(["<think>x</think> 7", "7", "8"], ["7", "7", "7"], {"accuracy": 1.0, "format": 0.5})
  np.testing.assert_array_equal(got, np.float32([1.5, 1.0, 0.0]))
  with pytest.raises(ValueError, match="unknown rewards \\['lenght'\\]"):
    rewards.score(["7"], ["7"], {"lenght": 1.0})
  with pytest.raises(ValueError, match="2 completions for 1 references"):
    rewards.score(["7", "8"], ["7"], {"accuracy": 1.0})
  with pytest.raises(ValueError, match="no checkable answer"):
    rewards.accuracy_reward("7", "none")


def test_select_prompts_keeps_accuracy_between_the_bounds():
  correct = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
  kept, acc = rewards.select_prompts(correct)
  np.testing.assert_allclose(acc, [1.0, 0.0, 0.2, 0.8, 0.4])
  np.testing.assert_array_equal(kept, [2, 3, 4])  # both bounds inclusive
  np.testing.assert_array_equal(rewards.select_prompts(correct, 0.3, 0.5)[0], [4])
  with pytest.raises(ValueError, match="low <= high"):
    rewards.select_prompts(correct, 0.9, 0.1)
