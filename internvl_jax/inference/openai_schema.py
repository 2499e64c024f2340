"""The chat-completions request the server accepts (pydantic, strict types) and its conversion to model
inputs. Every field is type- and range-checked here, before anything is decoded or tokenized:

* strict JSON types: `"stream": "false"`, `"max_tokens": 2.7` or `true`, `"stop": 5` are errors, not coerced;
* `temperature` finite in [0, 2] (OpenAI's range), `top_p` in (0, 1], `top_k` 0 (off, or -1 as vLLM spells
  it) up to the vocabulary size, `repetition_penalty` finite and > 0, `max_tokens` / `max_completion_tokens`
  a positive integer, `stop` a non-empty string or a list of at most 4, `seed` a 64-bit integer, `n` 1;
* JSON nesting deeper than pydantic-core's limit (200) is malformed JSON; unknown fields are errors;
* images only as base64 `data:` URLs (no path or URL is ever opened); their size is read from the header
  and refused above the pixel limit before any pixel is decoded.

`BadRequest` carries the HTTP status (400, or 404 for an unknown model) and a message naming the field.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Annotated, Literal, Union

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from internvl_jax.inference.sampling import Sampling


class BadRequest(ValueError):
  """A client error: answered with HTTP `status` (400 unless said) and this message."""

  def __init__(self, message: str, status: int = 400, code: str | None = None):
    super().__init__(message)
    self.status, self.code = status, code


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImageURL(_Strict):
  url: str
  detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: ImageURL


# Unions pick their branch by the input's JSON type (a callable discriminator), so an error names the field
# and that branch's problem, not every alternative. Branch tags hold a space: never a field name (`describe`).
def _json_type(value):
  return "as string" if isinstance(value, str) else "as list" if isinstance(value, list) else None


def _part_type(value):
  return f"{value.get('type')} part" if isinstance(value, dict) else None


Part = Annotated[Union[Annotated[TextPart, Tag("text part")], Annotated[ImagePart, Tag("image_url part")]],
                 Discriminator(_part_type, custom_error_type="content_part",
                               custom_error_message="expected a part of type 'text' or 'image_url'")]


class Message(_Strict):
  role: Literal["system", "user", "assistant"]
  content: Annotated[Union[Annotated[str, Tag("as string")], Annotated[list[Part], Tag("as list")]],
                     Discriminator(_json_type, custom_error_type="content",
                                   custom_error_message="must be a string or a list of parts")]
  name: str | None = None


class StreamOptions(_Strict):
  include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]
Stop = Annotated[Union[Annotated[StopString, Tag("as string")], Annotated[list[StopString], Field(max_length=4),
                                                                          Tag("as list")]],
                 Discriminator(_json_type, custom_error_type="stop",
                               custom_error_message="must be a string or a list of at most 4 strings")]


class ChatCompletionRequest(_Strict):
  model: str | None = None
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(0.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1)
  repetition_penalty: float = Field(1.0, gt=0.0)
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: Stop | None = None
  seed: int | None = Field(None, ge=-2**63, lt=2**64)
  n: Literal[1] = 1
  user: str | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask of the server (serve.py flags of the same names)."""

  max_len: int = 4096  # prompt + answer tokens
  max_tokens: int = 512  # default answer length
  max_request_bytes: int = 8 << 20
  max_image_pixels: int = 1 << 25  # 33.5 M: an 8K frame (7680 x 4320) fits


@dataclasses.dataclass
class Parsed:
  sample: dict  # processor output: input_ids, pixel_values, ...
  sampling: Sampling
  max_tokens: int
  stop: tuple[str, ...]
  seed: int | None
  stream: bool
  include_usage: bool


def _where(loc) -> str:
  out = ""
  for part in loc:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out or "body"


def describe(error: ValidationError) -> str:
  """One line per problem (at most 4), each naming the field: 'temperature: Input should be ...'."""
  lines = []
  for e in error.errors(include_url=False):
    if e["type"] == "json_invalid":
      return f"malformed JSON: {e['msg']}"
    loc = [p for p in e["loc"] if not (isinstance(p, str) and " " in p)]  # drop the union branch tags
    line = f"unknown field {_where(loc)}" if e["type"] == "extra_forbidden" else f"{_where(loc)}: {e['msg']}"
    if line not in lines:
      lines.append(line)
  return "; ".join(lines[:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")


def open_image(url: str, where: str, max_pixels: int) -> Image.Image:
  """A base64 data: URL -> PIL image, refused above `max_pixels` from its header, before decoding."""
  if not url.startswith("data:"):
    raise BadRequest(f"{where}: only base64 data: URLs are accepted (the server opens no paths or URLs)")
  head, _, payload = url.partition(",")
  if ";base64" not in head:
    raise BadRequest(f"{where}: the data: URL must be base64-encoded")
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise BadRequest(f"{where}: invalid base64 data") from None
  try:
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
      raise BadRequest(f"{where}: the image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                       f"over the limit of {max_pixels} (--max_image_pixels)")
    image.load()
  except Image.DecompressionBombError as e:  # PIL's own bound, when it is below ours
    raise BadRequest(f"{where}: {e}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
    if isinstance(e, BadRequest):
      raise
    raise BadRequest(f"{where}: cannot read image: {e}") from None
  return image


def parse(body: bytes, processor, *, model_name: str, vocab_size: int, limits: Limits) -> Parsed:
  """Request body -> Parsed; BadRequest naming the field at fault."""
  try:
    req = ChatCompletionRequest.model_validate_json(body)
  except ValidationError as e:
    raise BadRequest(describe(e)) from None
  if req.model is not None and req.model != model_name:
    raise BadRequest(f"model {req.model!r} does not exist; this server serves {model_name!r}", status=404,
                     code="model_not_found")
  if req.top_k > vocab_size:
    raise BadRequest(f"top_k: {req.top_k} is more than the vocabulary ({vocab_size} tokens)")
  messages = []
  for i, m in enumerate(req.messages):
    if isinstance(m.content, str):
      content = m.content
    else:
      content = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                 {"type": "image", "image": open_image(p.image_url.url, f"messages[{i}].content[{j}]",
                                                       limits.max_image_pixels)}
                 for j, p in enumerate(m.content)]
    messages.append({"role": m.role, "content": content})
  max_tokens = req.max_completion_tokens or req.max_tokens or limits.max_tokens
  try:
    sample = processor(messages)
  except ValueError as e:
    raise BadRequest(str(e)) from None
  n = len(sample["input_ids"])
  if n + max_tokens > limits.max_len:
    raise BadRequest(f"prompt of {n} tokens + max_tokens {max_tokens} exceeds the context of {limits.max_len} "
                     "tokens (--max_len)")
  stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
  sampling = Sampling(req.temperature, max(req.top_k, 0), req.top_p, req.repetition_penalty)
  return Parsed(sample, sampling, max_tokens, stop, req.seed, req.stream,
                bool(req.stream_options and req.stream_options.include_usage))
