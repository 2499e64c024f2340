"""Rollouts for online RL: G responses per prompt sampled by the inference Engine from the current parameters
(no copy into another framework), each token's log-prob under the sampling policy recorded as it is drawn,
and the GSPO batch made of them.

Questions are `data.load_records` dicts: {'dataset', 'messages' (the conversation before the answer),
'images', 'reference'}.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from internvl_jax.data import packing
from internvl_jax.data.samples import Sample
from internvl_jax.inference.engine import Engine, generate
from internvl_jax.inputs.labels import IGNORE
from internvl_jax.inputs.processor import pad_batch
from internvl_jax.training.rl import rewards


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

  def score(self, weights: dict[str, float]) -> np.ndarray:
    """[P, G] rewards: `rewards.score` of every response against its question's reference."""
    g = self.ids.shape[1]
    refs = [q["reference"] for q in self.questions for _ in range(g)]
    flat = [t for texts in self.texts for t in texts]
    return rewards.score(flat, refs, weights).reshape(len(self.questions), g)


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
                       return_logps=True, engine=engine, flash=False)  # the step scores the 256-token prompt
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


def gspo_batch(rollouts: Rollouts, prompt_index, advantages, *, max_tokens: int, max_tiles: int, pad_id: int,
               tile_size: int) -> dict:
  """The `gspo.gspo_step` batch of the chosen prompts' groups: B = len(prompt_index) x G unpacked rows of
  max_tokens, prompt then response (labels on the response only); pixel_values [B, max_tiles, tile_size,
  tile_size, 3] (the prompt's tiles, then zero tiles; absent when max_tiles is 0, as `packing.make_batch`);
  old_logps [B, max_tokens - 1] aligned with the shifted labels; advantages [B] from `advantages` [P, G]."""
  g = rollouts.ids.shape[1]
  rows = []
  for i in prompt_index:
    prompt, tiles = rollouts.prompts[i]["input_ids"], rollouts.prompts[i]["pixel_values"]
    if tiles is not None and len(tiles) > max_tiles:
      raise ValueError(f"prompt {i} has {len(tiles)} tiles, more than the row's {max_tiles}")
    for k in range(g):
      n_p, n_r = len(prompt), int(rollouts.lengths[i, k])
      if n_p + n_r > max_tokens:
        raise ValueError(f"prompt {i} ({n_p} tokens) + response ({n_r}) is longer than the row's {max_tokens} "
                         "tokens; raise data.max_tokens or drop the prompt")
      response = rollouts.ids[i, k, :n_r]
      labels = np.concatenate([np.full(n_p, IGNORE), response]).astype(np.int32)
      rows.append([Sample(0, np.concatenate([prompt, response]).astype(np.int32), labels,
                          (labels != IGNORE).astype(np.float32), tiles)])
  # pixel_values whenever max_tiles > 0 (zero tiles for text-only rows), as in SFT, so that batches of
  # text-only and image prompts have the same keys and concatenate
  out = packing.make_batch(rows, batch_size=len(rows), max_tokens=max_tokens, max_tiles=max_tiles, pad_id=pad_id,
                           tile_size=tile_size)
  out.pop("num_tiles")
  out["old_logps"] = np.zeros((len(rows), max_tokens - 1), np.float32)
  out["advantages"] = np.zeros((len(rows),), np.float32)
  for r, (i, k) in enumerate((i, k) for i in prompt_index for k in range(g)):
    n_p, n_r = len(rollouts.prompts[i]["input_ids"]), int(rollouts.lengths[i, k])
    out["old_logps"][r, n_p - 1:n_p - 1 + n_r] = rollouts.logps[i, k, :n_r]  # predicts response token j
    out["advantages"][r] = advantages[i, k]
  return out
