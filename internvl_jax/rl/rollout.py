"""Rollouts for online RL: G responses per prompt sampled by the inference Engine from the current parameters
(no copy into another framework), each token's log-prob under the sampling policy recorded as it is drawn,
and the GSPO batch made of them.

Questions are `data.load_records` dicts: {'dataset', 'messages' (the conversation before the answer),
'images', 'reference'}.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from internvl_jax.generation import Engine, generate
from internvl_jax.processor import IGNORE, pad_batch


@dataclasses.dataclass
class Rollouts:
  """P prompts x G responses. ids/logps are [P, G, N] (N = max_new_tokens; pad_id and 0 after a response
  ends); lengths [P, G] count each response's tokens, its end-of-turn token included; texts [P][G] are the
  decoded responses."""
  questions: list
  prompts: list  # the processor's output per prompt: input_ids [n] and pixel_values [tiles, S, S, 3] or None
  ids: np.ndarray
  logps: np.ndarray
  lengths: np.ndarray
  texts: list

  @property
  def truncated(self) -> np.ndarray:
    """[P, G]: responses cut at max_new_tokens before they ended their turn."""
    return self.lengths == self.ids.shape[2]


def sample(model, engine: Engine, processor, questions: list, *, group_size: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           max_rows: int = 64) -> Rollouts:
  """G = group_size responses to each question from `model` (the current parameters) through `engine`'s
  compiled programs, generated max_rows rows at a time (each prompt's G copies side by side)."""
  tok = processor.tokenizer
  if max_rows % group_size:
    raise ValueError(f"max_rows={max_rows} must be a multiple of group_size={group_size}")
  prompts = [processor(q["messages"], images=q["images"] or None) for q in questions]
  per_call = max_rows // group_size
  ids, logps = [], []
  for start in range(0, len(prompts), per_call):
    chunk = [p for p in prompts[start:start + per_call] for _ in range(group_size)]
    batch = pad_batch(chunk, tok.pad_id, side="left")
    out, lp = generate(model, batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed + start, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id,
                       return_logps=True, engine=engine)
    ids.append(out)
    logps.append(lp)
  p = len(prompts)
  ids = np.concatenate(ids).reshape(p, group_size, max_new_tokens)
  logps = np.concatenate(logps).reshape(p, group_size, max_new_tokens)
  ends = ids == tok.eos_id
  lengths = np.where(ends.any(-1), ends.argmax(-1) + 1, max_new_tokens)
  texts = [[tok.decode([int(t) for t in ids[i, g, :lengths[i, g]] if t != tok.eos_id]).strip()
            for g in range(group_size)] for i in range(p)]
  return Rollouts(list(questions), prompts, ids, logps, lengths, texts)


def gspo_batch(rollouts: Rollouts, prompt_index, advantages, *, max_tokens: int, max_tiles: int,
               pad_id: int) -> dict:
  """The `gspo.gspo_step` batch of the chosen prompts' groups: B = len(prompt_index) x G unpacked rows of
  max_tokens, prompt then response (labels on the response only), pixel_values [B, max_tiles, S, S, 3],
  old_logps [B, max_tokens - 1] aligned with the shifted labels, advantages [B] from `advantages` [P, G]."""
  g = rollouts.ids.shape[1]
  rows = len(prompt_index) * g
  out = {"input_ids": np.full((rows, max_tokens), pad_id, np.int32),
         "labels": np.full((rows, max_tokens), IGNORE, np.int32),
         "loss_weights": np.zeros((rows, max_tokens), np.float32),
         "segment_ids": np.zeros((rows, max_tokens), np.int32),
         "position_ids": np.zeros((rows, max_tokens), np.int32),
         "old_logps": np.zeros((rows, max_tokens - 1), np.float32),
         "advantages": np.zeros((rows,), np.float32)}
  pixels = [rollouts.prompts[i]["pixel_values"] for i in prompt_index]
  shape = next((x.shape[1:] for x in pixels if x is not None), None)
  if max_tiles and shape is not None:
    out["pixel_values"] = np.zeros((rows, max_tiles) + tuple(shape), np.float32)
  for r, (j, k) in enumerate((j, k) for j in range(len(prompt_index)) for k in range(g)):
    i, tiles = prompt_index[j], pixels[j]
    prompt = rollouts.prompts[i]["input_ids"]
    n_p, n_r = len(prompt), int(rollouts.lengths[i, k])
    if n_p + n_r > max_tokens:
      raise ValueError(f"prompt {i} ({n_p} tokens) + response ({n_r}) is longer than the row's {max_tokens} "
                       "tokens; raise data.max_tokens or drop the prompt")
    response = rollouts.ids[i, k, :n_r]
    out["input_ids"][r, :n_p], out["input_ids"][r, n_p:n_p + n_r] = prompt, response
    out["labels"][r, n_p:n_p + n_r] = response
    out["loss_weights"][r, n_p:n_p + n_r] = 1.0
    out["segment_ids"][r, :n_p + n_r] = 1
    out["position_ids"][r, :n_p + n_r] = np.arange(n_p + n_r)
    out["old_logps"][r, n_p - 1:n_p - 1 + n_r] = rollouts.logps[i, k, :n_r]
    out["advantages"][r] = advantages[i, k]
    if tiles is not None:
      if len(tiles) > max_tiles:
        raise ValueError(f"prompt {i} has {len(tiles)} tiles, more than the row's {max_tiles}")
      out["pixel_values"][r, :len(tiles)] = tiles
  return out
