"""`chat`: one conversational turn (processor -> generate -> text), with thinking mode and stop strings."""
from __future__ import annotations

from internvl_jax.inference.engine import generate
from internvl_jax.inputs.conversation import Template, harmony_reply_done, parse_harmony


def split_thinking(text: str) -> tuple[str, str]:
  """Thinking mode: (the <think>...</think> section's content, the answer after it)."""
  start, end = text.find("<think>"), text.find("</think>")
  if start < 0 or end < start:
    return "", text.strip()
  return text[start + len("<think>"):end].strip(), text[end + len("</think>"):].strip()


def reply_answer(template: Template, text: str, *, thinking: bool = False, stop=()):
  """The answer in `text`, the generated continuation of the prompt (decoded with special tokens, eos and
  padding removed): cut at the first `stop` string, then the text, or (thinking, answer) when thinking.
  Harmony: the final channel's text (its `<|channel|>final<|message|>` header and close dropped) and the
  analysis channel's as the thinking."""
  cuts = [text.index(s) for s in stop if s in text]
  text = text[:min(cuts)] if cuts else text
  if template.harmony:
    analysis, final = parse_harmony(text)
    return (analysis, final) if thinking else final
  return split_thinking(text) if thinking else text.strip()


def reply_text(template: Template, tok, tokens) -> tuple[str, bool]:
  """What a client sees of the reply tokens so far (eos excluded) and whether the reply is complete before
  any eos: the text; for harmony, the final channel's text so far (the server does not send the analysis
  channel), complete once `harmony_reply_done`."""
  if not template.harmony:
    return tok.decode(tokens), False
  raw = tok.decode(tokens, skip_special_tokens=False)
  return parse_harmony(raw)[1], harmony_reply_done(raw)


def chat(model, processor, question: str, images=None, video=None, *, history=None, system=None,
         thinking: bool = False, max_new_tokens: int = 512, stop=(), stream=None, flash: bool | None = None,
         return_stats: bool = False, **sampling):
  """Answer `question` about `images` (list) or `video` (a path); returns the text, or (thinking, answer)
  when thinking=True. `history` is a list of earlier {'role', 'content'} messages; `stop` strings end the
  answer (and are cut off); stream(text_so_far) is called as tokens arrive, with the raw decoded text
  (harmony channel markers included). flash: route tiles through a Flash model's ViR router (default: its
  flash_mode; see `generate`); return_stats=True returns (answer, stats) with stats = {tiles,
  compressed_tiles, visual_tokens_before, visual_tokens_after}.

  Generation ends at the template's stop tokens (harmony: `<|return|>`, as the official chat's sep2 eos)
  and, for harmony, also once the final message is closed by `<|end|>` (see `harmony_reply_done`)."""
  messages = list(history or []) + [{"role": "user", "content": question}]
  sample_ = processor(messages, images=images, videos=[video] if video else None, system=system, thinking=thinking)
  tok, template = processor.tokenizer, processor.template
  stops = tuple(stop)
  eos = tuple(dict.fromkeys(tok.token_id(s) for s in template.stop))
  dropped = {tok.pad_id, *eos}

  def decoded(ids):
    return tok.decode([int(i) for i in ids if i not in dropped], skip_special_tokens=False)

  def done(i, new):
    text = decoded(new)
    return any(s in text for s in stops) or (template.harmony and harmony_reply_done(text))

  on_step = None if stream is None else (lambda step, t, acc=[]: (acc.append(int(t[0])), stream(decoded(acc))))
  ids, stats = generate(model, sample_["input_ids"][None], sample_["pixel_values"], max_new_tokens=max_new_tokens,
                        eos_token_ids=eos, pad_token_id=tok.pad_id, stream=on_step,
                        stop=done if stops or template.harmony else None,
                        flash=flash, return_stats=True, **sampling)
  answer = reply_answer(template, decoded(ids[0]), thinking=thinking, stop=stops)
  return (answer, stats[0]) if return_stats else answer
