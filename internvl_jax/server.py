"""OpenAI-compatible HTTP server with continuous batching (FastAPI + uvicorn).

One background thread owns the generation engine and a KV cache of `max_batch` rows. New requests are
prefilled alone and copied into a free row; every loop iteration decodes one token for all active rows,
so requests join and leave the running batch independently. Tokens travel to each request's asyncio queue.
The server reads images only from base64 `data:` URLs inside the request, never from paths or URLs.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import json
import queue
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from flax import nnx

from internvl_jax.generation import Engine, Sampling, sample, settings_arrays

ALLOWED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stream",
           "stop", "repetition_penalty", "seed", "n", "user", "stream_options"}


class BadRequest(ValueError):
  """Client error: answered with HTTP 400 and this message."""


@dataclasses.dataclass
class Request:
  ids: np.ndarray
  pixels: np.ndarray | None
  sampling: Sampling
  max_tokens: int
  stop: tuple[str, ...]
  loop: asyncio.AbstractEventLoop
  out: asyncio.Queue
  cancelled: bool = False
  tokens: list = dataclasses.field(default_factory=list)


class Batcher:
  """The decode loop: admits queued requests into free cache rows and steps all active rows together."""

  def __init__(self, model, processor, *, max_batch: int = 8, max_len: int = 4096, seed: int = 0):
    self.engine, self.state = Engine(model), nnx.state(model)
    self.tok, self.cfg = processor.tokenizer, model.cfg
    self.max_batch, self.max_len = max_batch, max_len
    self.pending: queue.Queue[Request] = queue.Queue()
    self.slots: list[Request | None] = [None] * max_batch  # the rows of the running batch
    self.finished = collections.deque(maxlen=256)  # (completion tokens, reason) of recent requests
    self.key = jax.random.key(seed)
    self.thread = threading.Thread(target=self._run, daemon=True, name="decode-loop")
    self.thread.start()

  def submit(self, req: Request):
    if len(req.ids) + req.max_tokens > self.max_len:
      raise BadRequest(f"prompt of {len(req.ids)} tokens + max_tokens {req.max_tokens} exceeds the context "
                       f"of {self.max_len} tokens")
    self.pending.put(req)

  def _emit(self, req: Request, item):
    try:
      req.loop.call_soon_threadsafe(req.out.put_nowait, item)
    except RuntimeError:  # the request's event loop is gone (server shutting down)
      req.cancelled = True

  def _finish(self, req: Request, reason: str):
    self.finished.append((len(req.tokens), reason))
    self._emit(req, ("end", reason))

  def _run(self):
    b, v = self.max_batch, self.cfg.text.vocab_size
    slots = self.slots
    cache = tokens = seen = None
    samplings = [Sampling()] * b
    while True:
      # Admit waiting requests into free rows (block when there is nothing to do).
      while None in slots:
        try:
          req = self.pending.get(block=all(s is None for s in slots))
        except queue.Empty:
          break
        if req.cancelled:
          continue
        try:
          logits, one, _ = self.engine.prefill(self.state, [req.ids], req.pixels, self.max_len)
        except Exception as e:  # a request must not take the loop down
          self._emit(req, ("error", str(e)))
          continue
        if cache is None:
          cache = jax.tree.map(lambda x: jnp.zeros((b,) + x.shape[1:], x.dtype), one)
          tokens, seen = jnp.zeros((b,), jnp.int32), jnp.zeros((b, v), bool)
        row = slots.index(None)
        slots[row], samplings[row] = req, req.sampling
        cache = self.engine.insert(cache, one, row)
        seen = seen.at[row].set(False).at[row, jnp.asarray(req.ids)].set(True)
        self.key, sub = jax.random.split(self.key)
        first = sample(logits[:1], sub, seen[row:row + 1], *settings_arrays([req.sampling], 1))
        tokens = tokens.at[row].set(first[0])
        seen = seen.at[row, first[0]].set(True)
        self._advance(slots, row, int(first[0]))
      active = np.array([s is not None for s in slots])
      if not active.any():
        continue
      self.key, sub = jax.random.split(self.key)
      longest = max(len(s.ids) + len(s.tokens) for s in slots if s is not None)
      try:
        tokens, cache, seen, _ = self.engine.decode(self.state, tokens, cache, seen, jnp.asarray(active), sub,
                                                 settings_arrays(samplings, b), longest)
        host = np.asarray(tokens)
      except Exception as e:  # fail the running requests, keep serving new ones
        for row in np.flatnonzero(active):
          self._emit(slots[row], ("error", f"decoding failed: {e}"))
          slots[row] = None
        cache = None
        continue
      for row in np.flatnonzero(active):
        self._advance(slots, row, int(host[row]))

  def _advance(self, slots, row: int, token: int):
    """Record one new token of the request in `row`; free the row when it is done."""
    req = slots[row]
    if req.cancelled:
      slots[row] = None
      self.finished.append((len(req.tokens), "cancelled"))
      return
    if token in (self.tok.eos_id, self.tok.pad_id):
      slots[row] = None
      return self._finish(req, "stop")
    req.tokens.append(token)
    text = self.tok.decode(req.tokens)
    hit = next((s for s in req.stop if s in text), None)
    if hit is not None:
      slots[row] = None
      self._emit(req, ("text", text[:text.index(hit)]))
      return self._finish(req, "stop")
    self._emit(req, ("text", text))
    if len(req.tokens) >= req.max_tokens:
      slots[row] = None
      self._finish(req, "length")


def decode_image_url(url: str, where: str) -> bytes:
  if not isinstance(url, str) or not url.startswith("data:"):
    raise BadRequest(f"{where}: only base64 data: URLs are accepted (the server opens no paths or URLs)")
  head, _, payload = url.partition(",")
  if ";base64" not in head:
    raise BadRequest(f"{where}: the data: URL must be base64-encoded")
  try:
    return base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise BadRequest(f"{where}: invalid base64 data") from None


def parse(body: bytes, processor, default_max_tokens: int):
  """Request JSON -> (processor output, Sampling, max_tokens, stop strings, stream flag); BadRequest on error."""
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadRequest(f"malformed JSON: {e}") from None
  if not isinstance(data, dict):
    raise BadRequest("the request body must be a JSON object")
  unknown = sorted(set(data) - ALLOWED)
  if unknown:
    raise BadRequest(f"unknown fields: {unknown}")
  if data.get("n", 1) != 1:
    raise BadRequest("only n=1 is supported")
  messages = data.get("messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("'messages' must be a non-empty list")
  converted = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
      raise BadRequest(f"messages[{i}]: needs a role of system, user or assistant")
    content = m.get("content")
    if isinstance(content, list):
      parts = []
      for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
          parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
          url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
          parts.append({"type": "image", "image": decode_image_url(url, f"messages[{i}].content[{j}]")})
        else:
          raise BadRequest(f"messages[{i}].content[{j}]: expected a text or image_url part")
      content = parts
    elif not isinstance(content, str):
      raise BadRequest(f"messages[{i}]: content must be a string or a list of parts")
    converted.append({"role": m["role"], "content": content})
  try:
    sampling = Sampling(float(data.get("temperature", 0.0)), int(data.get("top_k", 0)),
                        float(data.get("top_p", 1.0)), float(data.get("repetition_penalty", 1.0)))
    max_tokens = int(data.get("max_completion_tokens", data.get("max_tokens", default_max_tokens)))
  except (TypeError, ValueError) as e:
    raise BadRequest(f"bad sampling field: {e}") from None
  if max_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
    raise BadRequest("need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0")
  stop = data.get("stop") or ()
  stop = (stop,) if isinstance(stop, str) else tuple(stop)
  if not all(isinstance(s, str) for s in stop):
    raise BadRequest("'stop' must be a string or a list of strings")
  try:
    sample_ = processor(converted)
  except ValueError as e:
    raise BadRequest(str(e)) from None
  return sample_, sampling, max_tokens, stop, bool(data.get("stream", False))


def make_app(model, processor, *, model_name: str = "internvl", max_batch: int = 8, max_len: int = 4096,
             max_tokens: int = 512):
  app = FastAPI(title="internvl-jax")
  batcher = Batcher(model, processor, max_batch=max_batch, max_len=max_len)
  app.state.batcher = batcher

  @app.get("/health")
  def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "internvl-jax"}]}

  @app.post("/v1/chat/completions")
  async def completions(http: HTTPRequest):
    loop = asyncio.get_running_loop()
    try:
      sample_, sampling, n_max, stop, stream = await loop.run_in_executor(
          None, parse, await http.body(), processor, max_tokens)
      req = Request(sample_["input_ids"], sample_["pixel_values"], sampling, n_max, stop, loop, asyncio.Queue())
      batcher.submit(req)
    except BadRequest as e:
      return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
    base = {"id": rid, "created": created, "model": model_name}

    if not stream:
      text, reason = "", "stop"
      while True:
        kind, value = await req.out.get()
        if kind == "text":
          text = value
        elif kind == "error":
          return JSONResponse({"error": {"message": value, "type": "invalid_request_error"}}, status_code=400)
        else:
          reason = value
          break
      usage = {"prompt_tokens": len(req.ids), "completion_tokens": len(req.tokens),
               "total_tokens": len(req.ids) + len(req.tokens)}
      return {**base, "object": "chat.completion", "usage": usage,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}]}

    async def events():
      sent = ""
      try:
        yield _sse({**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        while True:
          kind, value = await req.out.get()
          if kind == "text":
            delta, sent = value[len(sent):], value
            if delta:
              yield _sse({**base, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]})
          else:
            reason = value if kind == "end" else "error"
            yield _sse({**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
            yield "data: [DONE]\n\n"
            return
      finally:  # the client went away (or we finished): free the row
        req.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream")

  return app


def _sse(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
