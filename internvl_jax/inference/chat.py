"""`chat`: one conversational turn (processor -> generate -> text), with thinking mode and stop strings."""
from __future__ import annotations

from internvl_jax.inference.engine import generate


def split_thinking(text: str) -> tuple[str, str]:
  """Thinking mode: (the <think>...</think> section's content, the answer after it)."""
  start, end = text.find("<think>"), text.find("</think>")
  if start < 0 or end < start:
    return "", text.strip()
  return text[start + len("<think>"):end].strip(), text[end + len("</think>"):].strip()


def chat(model, processor, question: str, images=None, video=None, *, history=None, system=None,
         thinking: bool = False, max_new_tokens: int = 512, stop=(), stream=None, flash: bool | None = None,
         return_stats: bool = False, **sampling):
  """Answer `question` about `images` (list) or `video` (a path); returns the text, or (thinking, answer)
  when thinking=True. `history` is a list of earlier {'role', 'content'} messages; `stop` strings end the
  answer (and are cut off); stream(text_so_far) is called as tokens arrive. flash: route tiles through a
  Flash model's ViR router (default: its flash_mode; see `generate`); return_stats=True returns
  (answer, stats) with stats = {tiles, compressed_tiles, visual_tokens_before, visual_tokens_after}."""
  messages = list(history or []) + [{"role": "user", "content": question}]
  sample_ = processor(messages, images=images, videos=[video] if video else None, system=system, thinking=thinking)
  tok = processor.tokenizer
  stops = tuple(stop)

  def decoded(ids):
    return tok.decode([int(i) for i in ids if i not in (tok.pad_id, tok.eos_id)], skip_special_tokens=False)

  on_step = None if stream is None else (lambda step, t, acc=[]: (acc.append(int(t[0])), stream(decoded(acc))))
  ids, stats = generate(model, sample_["input_ids"][None], sample_["pixel_values"], max_new_tokens=max_new_tokens,
                        eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id, stream=on_step,
                        stop=(lambda i, new: any(s in decoded(new) for s in stops)) if stops else None,
                        flash=flash, return_stats=True, **sampling)
  text = decoded(ids[0])
  for s in stops:
    if s in text:
      text = text[:text.index(s)]
  answer = split_thinking(text) if thinking else text.strip()
  return (answer, stats[0]) if return_stats else answer
