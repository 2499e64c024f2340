"""Processor: chat messages with images and videos -> input_ids, attention_mask, pixel_values and, for
training, labels (official `preprocess_internvl2_5` masking) and square-averaging loss weights (`labels.py`).

Messages are `{'role': 'system'|'user'|'assistant', 'content': ...}` or InternVL's data format
`{'from': 'system'|'human'|'gpt', 'value': ...}`. Content is a string with `<image>` / `<video>`
placeholders filled in order from `images=` / `videos=`, or a list of parts `{'type': 'text', 'text': ...}`,
`{'type': 'image', 'image': PIL | path | bytes | array}`, `{'type': 'video', 'video': path | [frames]}`.
The image markers `<img>`, `</img>` and `<IMG_CONTEXT>`, the chat template's control tokens (`<|im_start|>`,
`<|im_end|>`; harmony's `<|start|>`, `<|message|>`, ...) and the tokenizer's pad token (`<|endoftext|>`) may
not appear in message text: the processor alone writes them. The tokenizer would read them as the special
tokens, so a user's text could forge a turn or break the pairing of each `<IMG_CONTEXT>` with an image
feature; such text is refused (ValueError), not silently re-tokenized.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from internvl_jax.inputs import dynamic_resolution as dr
from internvl_jax.inputs import labels as labels_lib
from internvl_jax.inputs import video as video_lib
from internvl_jax.inputs.conversation import IMG_CONTEXT, IMG_END, IMG_START, get_template, image_tokens
from internvl_jax.inputs.tokenizer import Tokenizer

_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_PLACEHOLDER = re.compile(r"<image>|<video>")


class Processor:
  """Chat messages with images and videos -> model inputs (see the module docstring for the formats).

  At inference, images/videos given without any `<image>`/`<video>` placeholder are put in front of the
  first user message, as the official `chat()` does. Training samples (train=True) must carry their
  placeholders in the text, as the official data does: nothing is inserted, and a count that does not match
  the images/videos given is an error.

  Training videos take `num_frames` frames when given, else a number drawn from min_num_frames..max_num_frames
  (inclusive; the official defaults 8 and 32), sampled by `sample` ('rand' or 'middle').
  """

  def __init__(self, tokenizer: Tokenizer, *, tokens_per_tile: int = 256, tile_size: int = 448, min_tiles: int = 1,
               max_tiles: int = 12, use_thumbnail: bool = True, template: str = "internvl2_5",
               min_num_frames: int = 8, max_num_frames: int = 32):
    if not 1 <= min_num_frames <= max_num_frames:
      raise ValueError(f"need 1 <= min_num_frames <= max_num_frames, got {min_num_frames}, {max_num_frames}")
    if tokenizer.template != template:
      raise ValueError(f"{tokenizer.name} was made for template {tokenizer.template!r} (its end-of-reply token), "
                       f"the processor for {template!r}: pass Tokenizer(..., template={template!r})")
    self.tokenizer, self.template = tokenizer, get_template(template)
    self.tokens_per_tile, self.tile_size = tokens_per_tile, tile_size
    self.min_tiles, self.max_tiles, self.use_thumbnail = min_tiles, max_tiles, use_thumbnail
    self.min_num_frames, self.max_num_frames = min_num_frames, max_num_frames
    reserved = (IMG_CONTEXT, IMG_START, IMG_END, *self.template.control_tokens, tokenizer.pad_token)
    self._reserved = re.compile("|".join(re.escape(t) for t in dict.fromkeys(reserved)))

  @classmethod
  def from_pretrained(cls, path: str, **overrides) -> "Processor":
    """Tokenizer and image settings of a checkpoint folder; checks the tokenizer against the model config."""
    # checkpoint/ imports the model (JAX); the processor, which data workers use, does not need it otherwise
    from internvl_jax.checkpoint.pretrained import load_config
    cfg, _ = load_config(path)
    tokenizer = Tokenizer.from_pretrained(path)
    tokenizer.check_model_config(cfg)
    with open(os.path.join(path, "config.json")) as f:
      raw = json.load(f)
    kw = dict(tokens_per_tile=cfg.tokens_per_tile, tile_size=cfg.vision.image_size,
              min_tiles=raw.get("min_dynamic_patch", 1), max_tiles=raw.get("max_dynamic_patch", 12),
              use_thumbnail=raw.get("use_thumbnail", True), template=raw.get("template", "internvl2_5"))
    return cls(tokenizer, **{**kw, **overrides})

  # ------------------------------------------------------------------------------------ messages

  def _normalise(self, messages):
    """-> [{'role', 'content': str}], and the visual placeholders in prompt order as
    [message index, 'image'|'video', source or None (to come from images= / videos=)]."""
    out, items = [], []
    for i, m in enumerate(messages):
      role = _ROLES.get(m.get("role", m.get("from")))
      if role is None:
        raise ValueError(f"message {i}: unknown role {m.get('role', m.get('from'))!r}")
      content = m.get("content", m.get("value"))
      texts = ([p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
               if isinstance(content, list) else [content] if isinstance(content, str) else [])
      for t in texts:
        if marker := self._reserved.search(t):
          raise ValueError(f"message {i}: the text holds {marker.group()!r}, a special token that only the processor "
                           "may write (it would forge a turn or break the image-token count); use <image>/<video> "
                           "placeholders for images")
      if isinstance(content, list):
        text = ""
        for part in content:
          kind = part.get("type")
          if kind == "text":
            if _PLACEHOLDER.search(part["text"]):
              raise ValueError(f"message {i}: a text part holds an <image>/<video> placeholder; use an image or "
                               "video part")
            text += part["text"]
          elif kind in ("image", "video"):
            text += f"<{kind}>\n"
            items.append([i, kind, part[kind]])
          else:
            raise ValueError(f"message {i}: unknown content part type {kind!r}")
        content = text
      elif isinstance(content, str):
        items += [[i, p[1:-1], None] for p in _PLACEHOLDER.findall(content)]
      else:
        raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
      if role != "user" and any(j == i for j, _, _ in items):
        raise ValueError(f"message {i}: images and videos belong in user messages, found in a {role} message")
      out.append({"role": role, "content": content})
    return out, items

  def _place(self, messages, items, images, videos, train):
    """Give every placeholder its source. At inference, images/videos passed without any placeholder go
    in front of the first user message (`<image>\\n`, or `Image-k: <image>\\n` for several, then the videos)."""
    images, videos = list(images or ()), list(videos or ())
    if not train and not items and (images or videos):
      first = next((j for j, m in enumerate(messages) if m["role"] == "user"), None)
      if first is None:
        raise ValueError("images or videos given without a user message")
      prefix = ("<image>\n" if len(images) == 1 else
                "".join(f"Image-{k + 1}: <image>\n" for k in range(len(images)))) + "<video>\n" * len(videos)
      messages[first]["content"] = prefix + messages[first]["content"]
      items = [[first, "image", None]] * len(images) + [[first, "video", None]] * len(videos)
    for kind, given in (("image", images), ("video", videos)):
      open_ = [j for j, k, src in items if k == kind and src is None]
      if len(open_) != len(given):
        raise ValueError(f"{len(open_)} <{kind}> placeholders (in messages {sorted(set(open_))}) but "
                         f"{len(given)} {kind}s given")
      sources = iter(given)
      items = [[j, k, next(sources) if k == kind and src is None else src] for j, k, src in items]
    return messages, items

  # ------------------------------------------------------------------------------------ visuals

  def _frames(self, source, train, rng, num_segments, num_frames, sample):
    if not isinstance(source, (str, os.PathLike)):
      return [dr.load_image(f, name=f"video frame {k}") for k, f in enumerate(source)]
    if train:
      # The official reader draws the frame count per video, randint(min_num_frame, max_num_frame).
      n = num_frames or int(rng.integers(self.min_num_frames, self.max_num_frames + 1))
      return video_lib.training_frames(source, n, sample, rng)
    return video_lib.load_video(source, num_segments)

  # ------------------------------------------------------------------------------------ main

  def __call__(self, messages, images=None, videos=None, *, train: bool = False, system: str | None = None,
               thinking: bool = False, add_generation_prompt: bool | None = None, max_length: int | None = None,
               rng: np.random.Generator | None = None, num_segments: int = 32, num_frames: int | None = None,
               sample: str = "rand", jpeg_augment: bool = False) -> dict:
    """One sample -> dict of numpy arrays: input_ids [L] int32, attention_mask [L] int32, pixel_values
    [tiles, S, S, 3] float32 or None, num_tiles [images + frames]; with train=True also labels [L] (-100 =
    ignored) and loss_weights [L]. Raises ValueError naming the message or file at fault.

    system: replaces the template's default system message (and a leading system message). thinking: use
    the template's thinking-mode system prompt, and its way of writing `<think>` sections of assistant
    messages (harmony: an analysis message); it is an error together with `system=` or a system message,
    since one of the two would have to be dropped silently. Videos: `num_segments` midpoint frames at inference;
    in training `num_frames` (or a drawn number, see the class docstring) frames by `sample` ('rand' or
    'middle'). jpeg_augment: re-encode every tile (and video frame) as JPEG at a random quality 75..100,
    as the official training transform does per tile."""
    rng = rng or np.random.default_rng()
    if sample not in ("rand", "middle"):
      raise ValueError(f"unknown frame sampling {sample!r} (expected 'rand' or 'middle')")
    if system is not None and (marker := self._reserved.search(system)):
      raise ValueError(f"system= holds {marker.group()!r}, which only the processor may write")
    messages, items = self._place(*self._normalise(messages), images, videos, train)
    if thinking:
      if system is not None:
        raise ValueError("thinking=True sets the system prompt; it cannot be combined with system=")
      if messages and messages[0]["role"] == "system":
        raise ValueError("thinking=True sets the system prompt; it cannot be combined with a system message "
                         "(message 0)")
      system = self.template.thinking_system
    # Images get max_tiles // number of images tiles each; video frames one tile each.
    per_image = max(1, self.max_tiles // max(1, sum(k == "image" for _, k, _ in items)))
    tiles, counts, sources = [], [], iter(items)

    def image_text(source, where, max_tiles):
      image = dr.load_image(source, name=source if isinstance(source, (str, os.PathLike)) else where)
      crops = dr.crop_tiles(image, min_tiles=min(self.min_tiles, max_tiles), max_tiles=max_tiles,
                            tile_size=self.tile_size, use_thumbnail=self.use_thumbnail)
      if jpeg_augment:  # per tile, each at its own quality: the official build_transform runs on tiles
        crops = [dr.jpeg_reencode(c, rng) for c in crops]
      tiles.append(dr.normalize(crops))
      counts.append(len(crops))
      return image_tokens(len(crops), self.tokens_per_tile)

    def expand(match):
      i, kind, source = next(sources)
      if kind == "image":
        return image_text(source, f"message {i}", per_image)
      frames = self._frames(source, train, rng, num_segments, num_frames, sample)
      names = _PLACEHOLDER.sub("{}", video_lib.frame_prompt(len(frames), training=train)).split("{}")
      return "".join(head + image_text(f, f"message {i}, video frame {j}", 1)
                     for j, (head, f) in enumerate(zip(names, frames))) + names[-1]

    for m in messages:
      if m["role"] == "user":
        # Inference frame prefixes end in "\n" themselves; training ones take the "\n" after <video>.
        m["content"] = _PLACEHOLDER.sub(expand, m["content"] if train else m["content"].replace("<video>\n", "<video>"))
    if add_generation_prompt is None:
      add_generation_prompt = not train and (not messages or messages[-1]["role"] != "assistant")
    turns = self.template.turns(messages, system=system, add_generation_prompt=add_generation_prompt,
                                thinking=thinking)
    ids, labels = [], []
    for turn in turns:
      t = self.tokenizer.encode(turn.text)
      ids += t
      if turn.role == "assistant":
        head = len(self.tokenizer.encode(turn.header))
        tail = len(self.tokenizer.encode(turn.trailer)) if turn.trailer else 0
        labels += [labels_lib.IGNORE] * head + t[head:len(t) - tail] + [labels_lib.IGNORE] * tail
      else:
        labels += [labels_lib.IGNORE] * len(t)
    if max_length is not None and len(ids) > max_length:
      raise ValueError(f"sample has {len(ids)} tokens, more than max_length={max_length}")
    out = {"input_ids": np.asarray(ids, np.int32), "attention_mask": np.ones(len(ids), np.int32),
           "pixel_values": np.concatenate(tiles) if tiles else None, "num_tiles": np.asarray(counts, np.int32)}
    if train:
      out["labels"] = np.asarray(labels, np.int32)
      out["loss_weights"] = labels_lib.loss_weights(out["labels"])
    return out

  def text(self, messages, **kw) -> str:
    """The rendered prompt (placeholders expanded), for inspection."""
    return self.tokenizer.decode(self(messages, **kw)["input_ids"], skip_special_tokens=False)


def pad_batch(samples: list[dict], pad_id: int, *, side: str = "right") -> dict:
  """Stack per-sample outputs into [batch, max_len] arrays (padding: input_ids pad_id, attention_mask 0,
  labels -100, loss_weights 0) and concatenate pixel_values in sample order."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  width = max(len(s["input_ids"]) for s in samples)
  fill = {"input_ids": pad_id, "attention_mask": 0, "labels": labels_lib.IGNORE, "loss_weights": 0.0}
  out = {}
  for key, value in fill.items():
    if key not in samples[0]:
      continue
    rows = []
    for s in samples:
      pad = np.full(width - len(s[key]), value, s[key].dtype)
      rows.append(np.concatenate([pad, s[key]] if side == "left" else [s[key], pad]))
    out[key] = np.stack(rows)
  pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
  out["pixel_values"] = np.concatenate(pixels) if pixels else None
  out["num_tiles"] = np.concatenate([s["num_tiles"] for s in samples])
  return out
