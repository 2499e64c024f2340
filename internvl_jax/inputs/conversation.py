"""Conversation templates (REFERENCE.md §5): how a chat becomes the text the released models saw.

`internvl2_5` (ChatML) is the template of the Qwen3-based InternVL3.5 models, `internvl3_5_gpt_oss` (OpenAI's
harmony format) that of InternVL3.5-GPT-OSS-20B-A4B. A rendered conversation is a list of `Turn`s (text +
which part is supervised), which the processor tokenizes turn by turn like the official
`preprocess_internvl2_5` / `preprocess_internvl3_5_gpt_oss`.
"""
from __future__ import annotations

import dataclasses
import re

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

# OpenGVLab/InternVL internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py, `internvl3_5_gpt_oss`.
HARMONY_SYSTEM = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: "
                  "2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be "
                  "included for every message.")
# The thinking variant keeps this system message, "Valid channels: final" included: the official
# `preprocess_internvl3_5_gpt_oss_with_think` (internvl_chat_gpt_oss/internvl/train/dataset.py) takes
# `get_conv_template(template_name).system_message` like the plain one, and no other system message for the
# analysis channel exists in the repo; whether the released model was trained on thinking data is unknown
# (its finetune script selects only the plain preprocess).
HARMONY_THINKING_SYSTEM = HARMONY_SYSTEM

# `<|call|>` and `<|constrain|>` are never written here, but they are harmony control tokens too: text holding
# them could end or re-route a message.
HARMONY_TOKENS = ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")
_HARMONY_CLOSE = re.compile(r"<\|end\|>|<\|return\|>|<\|call\|>")


def harmony_reply(content: str, thinking: bool = False) -> str:
  """An assistant message's text after `<|start|>assistant`, as the official preprocess writes it: the final
  channel, or with thinking (`preprocess_internvl3_5_gpt_oss_with_think`) a `<think>...</think>` section as
  an analysis message first; the final message then starts its own `<|start|>assistant`, which is
  supervised since the model writes it. (That official variant also closes every reply with `<|return|>`;
  here, as in its MPT_TWO template, only the conversation's last one.)"""
  if thinking and "<think>" in content and "</think>" in content:
    think, final = content.rsplit("</think>", 1)
    think = think.split("<think>", 1)[-1]
    return (f"<|channel|>analysis<|message|>{think.strip()}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{final.strip()}")
  return "<|channel|>final<|message|>" + content


def harmony_messages(text: str) -> list[tuple[str, str, bool]]:
  """(channel, body, closed) of each message in generated harmony text, which continues the prompt's
  `<|start|>assistant`. closed: the body ended with `<|end|>`, `<|return|>` or `<|call|>`. Text without any
  channel or message marker counts as the final channel: the model skipped the header."""
  out = []
  for k, chunk in enumerate(text.split("<|start|>")):
    head, has_body, body = chunk.partition("<|message|>")
    if not has_body:
      if k == 0 and "<|channel|>" not in chunk and chunk.strip():
        has_body, head, body = True, "", chunk
      else:
        continue  # a header still being written, or text outside any message
    # a header reads `{role}<|channel|>{name}[ to=...][<|constrain|>...]`; a message with no channel is final
    channel = re.split(r"\s|<\|", head.partition("<|channel|>")[2], maxsplit=1)[0] or "final"
    end = _HARMONY_CLOSE.search(body)
    out.append((channel, body[:end.start()] if end else body, end is not None))
  return out


def parse_harmony(text: str) -> tuple[str, str]:
  """Generated harmony text -> (analysis, final): the analysis messages joined, and the first final message
  (a model may run on after closing it)."""
  messages = harmony_messages(text)
  analysis = "\n".join(b.strip() for c, b, _ in messages if c == "analysis")
  final = next((b.strip() for c, b, _ in messages if c == "final"), "")
  return analysis, final


def harmony_reply_done(text: str) -> bool:
  """Whether the final message is complete. `<|end|>` also closes analysis messages, so it cannot be an eos
  token; but a final message closed by it is done: the official `preprocess_internvl3_5_gpt_oss` picks the
  closing token with a stale loop variable (the last image's index), so trained final messages often end
  with `<|end|>` where `<|return|>` was meant."""
  return any(c == "final" and closed for c, _, closed in harmony_messages(text))


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # 'system' | 'user' | 'assistant'
  text: str
  header: str = ""  # leading text of an assistant turn that is never supervised
  trailer: str = ""  # trailing text of an assistant turn that is never supervised


@dataclasses.dataclass(frozen=True)
class Template:
  """MPT-style: system turn, then `role header + content + sep` per message (official MPT / MPT_TWO)."""

  name: str
  system_message: str
  system_format: str  # with {system}
  user_header: str
  assistant_header: str  # also the generation prompt; never supervised
  sep: str
  stop: tuple[str, ...]  # eos tokens of generation
  control_tokens: tuple[str, ...] = ()  # the special tokens the template writes around turns
  sep2: str | None = None  # MPT_TWO: ends the last message instead of sep when that is an assistant reply
  assistant_trailer: str = ""  # the tail of an assistant turn's separator that is not supervised
  thinking_system: str = THINKING_SYSTEM  # the system message of thinking mode
  harmony: bool = False  # assistant content goes in harmony channels (`harmony_reply`, `parse_harmony`)

  def reply(self, content: str, thinking: bool = False) -> str:
    """An assistant message's text between its header and separator."""
    return harmony_reply(content, thinking) if self.harmony else content

  def turns(self, messages: list[dict], *, system: str | None = None, add_generation_prompt: bool = True,
            thinking: bool = False):
    """messages: [{'role': 'system'|'user'|'assistant', 'content': str}] (image placeholders already
    expanded). A leading system message replaces the default one; `system` overrides both. thinking: render
    assistant `<think>` sections the template's way (harmony: the analysis channel); the system message is
    the caller's choice (`thinking_system`).
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
        # sep2 rule of the official MPT_TWO get_prompt; the official preprocess means the same but tests a stale
        # loop variable (and raises on text-only samples)
        last = i == len(messages) - 1 and not add_generation_prompt
        sep = self.sep2 if last and self.sep2 is not None else self.sep
        head, body = self.assistant_header, self.reply(m["content"], thinking)
        out.append(Turn("assistant", head + body + sep, header=head, trailer=self.assistant_trailer))
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
        stop=("<|im_end|>",), control_tokens=("<|im_start|>", "<|im_end|>"), assistant_trailer="\n"),
    # Official chat() stops at sep2 and its prompt ends with the bare role `<|start|>assistant`, so the model
    # writes the channel header itself.
    "internvl3_5_gpt_oss": Template(
        name="internvl3_5_gpt_oss", system_message=HARMONY_SYSTEM, system_format="<|start|>system<|message|>{system}",
        user_header="<|start|>user<|message|>", assistant_header="<|start|>assistant", sep="<|end|>",
        sep2="<|return|>", stop=("<|return|>",), control_tokens=HARMONY_TOKENS,
        thinking_system=HARMONY_THINKING_SYSTEM, harmony=True),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


def image_tokens(num_tiles: int, tokens_per_tile: int) -> str:
  """What one `<image>` placeholder becomes: <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>."""
  return IMG_START + IMG_CONTEXT * (tokens_per_tile * num_tiles) + IMG_END
