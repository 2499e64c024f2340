"""The checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` library) and its special tokens.

InternVL adds `<img>`, `</img>`, `<IMG_CONTEXT>` (and quad/ref/box markers) to the base tokenizer; the
model's `image_token_id` must be the tokenizer's `<IMG_CONTEXT>` id, which `check_model_config` enforces.
The chat template decides the other required tokens and the end of a reply: `<|im_end|>` for ChatML
(`internvl2_5`), `<|return|>` for GPT-OSS's harmony (`internvl3_5_gpt_oss`).
"""
from __future__ import annotations

import json
import os

from internvl_jax.inputs.conversation import IMG_CONTEXT, IMG_END, IMG_START, get_template


class Tokenizer:
  """eos_id: the template's end of a reply; pad_id: `<|endoftext|>` when the vocabulary has it."""

  def __init__(self, tokenizer, *, name: str = "tokenizer", pad_token: str | None = None,
               template: str = "internvl2_5"):
    self.tok, self.name, self.template = tokenizer, name, template
    tpl = get_template(template)
    required = (IMG_START, IMG_END, IMG_CONTEXT, *tpl.control_tokens)
    missing = [t for t in required if tokenizer.token_to_id(t) is None]
    if missing:
      raise ValueError(f"{name}: special tokens {missing} are missing (InternVL with template {template!r} needs "
                       f"{list(required)})")
    self.pad_token = pad_token or ("<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None
                                   else tpl.stop[0])
    self.pad_id = self.token_id(self.pad_token)
    self.eos_id = self.token_id(tpl.stop[0])
    self.image_token_id = self.token_id(IMG_CONTEXT)

  @classmethod
  def from_pretrained(cls, folder: str, template: str | None = None) -> "Tokenizer":
    """`tokenizer.json` of a checkpoint folder; `tokenizer_config.json` (if present) for the pad token and
    a consistency check of its added tokens' ids. template: default the folder's config.json `template`
    (the original layout writes it), else 'internvl2_5'."""
    from tokenizers import Tokenizer as HFTokenizer
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found (the tokenizers-library file of the checkpoint)")
    try:
      tok = HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
      raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
    pad = None
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
      for i, t in config.get("added_tokens_decoder", {}).items():
        have = tok.token_to_id(t["content"])
        if have != int(i):
          raise ValueError(f"{config_path}: token {t['content']!r} has id {i} there but {have} in tokenizer.json")
      pad = config.get("pad_token")
      pad = pad.get("content") if isinstance(pad, dict) else pad
    if template is None:
      template = "internvl2_5"
      if os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
          template = json.load(f).get("template") or template
    return cls(tok, name=path, pad_token=pad, template=template)

  def token_id(self, token: str) -> int:
    i = self.tok.token_to_id(token)
    if i is None:
      raise KeyError(f"{self.name}: token {token!r} is not in the vocabulary")
    return i

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def check_model_config(self, cfg) -> None:
    """The model's image token and vocabulary must agree with this tokenizer."""
    if cfg.image_token_id != self.image_token_id:
      raise ValueError(f"{self.name}: <IMG_CONTEXT> is id {self.image_token_id} in the tokenizer but "
                       f"image_token_id={cfg.image_token_id} in the model config")
    if self.tok.get_vocab_size(with_added_tokens=True) > cfg.text.vocab_size:
      raise ValueError(f"{self.name}: {self.tok.get_vocab_size(with_added_tokens=True)} tokens do not fit the "
                       f"model's vocab_size={cfg.text.vocab_size}")
