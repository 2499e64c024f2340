"""Conversation templates (REFERENCE.md §5): how a chat becomes the text the released models saw.

`internvl2_5` (ChatML) is the template of the Qwen3-based InternVL3.5 models; `TEMPLATES` is a registry so
that GPT-OSS's harmony template (`internvl3_5_gpt_oss`) can be added beside it. A rendered conversation is
a list of `Turn`s (text + whether it is supervised), which the processor tokenizes turn by turn like the
official `preprocess_internvl2_5`.
"""
from __future__ import annotations

import dataclasses

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

INTERNVL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                   "多模态大语言模型。")

THINKING_SYSTEM = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate "
    "the answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section.")


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # 'system' | 'user' | 'assistant'
  text: str
  header: str = ""  # leading text of an assistant turn that is never supervised
  trailer: str = ""  # trailing text of an assistant turn that is never supervised


@dataclasses.dataclass(frozen=True)
class Template:
  """MPT-style: system turn, then `role header + content + sep` per message."""

  name: str
  system_message: str
  system_format: str  # with {system}
  user_header: str
  assistant_header: str
  sep: str
  stop: tuple[str, ...]
  control_tokens: tuple[str, ...] = ()  # the special tokens the template writes around turns

  def turns(self, messages: list[dict], *, system: str | None = None, add_generation_prompt: bool = True):
    """messages: [{'role': 'system'|'user'|'assistant', 'content': str}] (image placeholders already
    expanded). A leading system message replaces the default one; `system` overrides both.
    Returns the list of Turns (the open assistant header last when add_generation_prompt)."""
    if messages and messages[0]["role"] == "system":
      system = messages[0]["content"] if system is None else system
      messages = messages[1:]
    system = self.system_message if system is None else system
    out = [Turn("system", self.system_format.format(system=system) + self.sep)] if system is not None else []
    for i, m in enumerate(messages):
      if m["role"] == "user":
        out.append(Turn("user", self.user_header + m["content"] + self.sep))
      elif m["role"] == "assistant":
        head, tail = self.assistant_header, self.sep[len(self.stop[0]):]
        out.append(Turn("assistant", head + m["content"] + self.sep, header=head, trailer=tail))
      else:
        raise ValueError(f"message {i}: role {m['role']!r} after the first message (expected user/assistant)")
    if add_generation_prompt:
      out.append(Turn("generation", self.assistant_header))
    return out

  def render(self, messages: list[dict], **kw) -> str:
    return "".join(t.text for t in self.turns(messages, **kw))


TEMPLATES: dict[str, Template] = {
    "internvl2_5": Template(
        name="internvl2_5", system_message=INTERNVL_SYSTEM, system_format="<|im_start|>system\n{system}",
        user_header="<|im_start|>user\n", assistant_header="<|im_start|>assistant\n", sep="<|im_end|>\n",
        stop=("<|im_end|>",), control_tokens=("<|im_start|>", "<|im_end|>")),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


def image_tokens(num_tiles: int, tokens_per_tile: int) -> str:
  """What one `<image>` placeholder becomes: <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>."""
  return IMG_START + IMG_CONTEXT * (tokens_per_tile * num_tiles) + IMG_END
