"""OpenAI-compatible HTTP server with continuous batching (FastAPI + uvicorn).

One background thread (`Batcher`) owns the engine and a KV cache of `max_batch` rows. A new request is
prefilled alone, its first token drawn (and sent at once), and both joined into a free row (`Engine.join`);
each loop iteration then decodes a chunk of up to `chunk` tokens (default 8) for all running rows in one
dispatch (`Engine.decode`: eos, each request's max_tokens and its seeded sampling on the device), and replays
them per request for its stream and stop strings. Requests join at chunk boundaries, and a row that ends
(eos, length, a stop string mid-chunk, a cancelled client) is free for the next queued request at the next
boundary, so requests join and leave the batch independently. A stream receives the first token right
after its prefill and then the tokens of each chunk together: one burst per chunk's compute time (chunk x
the batch's step time). Every program the loop runs is jitted and bucketed (prefill by prompt length and
tiles, decode by attention span, first token and join once per shape), so a long-running server compiles a
bounded set of programs.

What keeps it up under hostile traffic:
* requests are validated before they reach the loop (`openai_schema`: strict types and ranges, body-size and
  image-pixel limits, unknown model -> 404);
* the loop cannot die on an exception: a failed prefill fails that request (HTTP 500 with the error), a
  failed decode chunk fails the rows that were running, and the loop goes on with a fresh batch. Should the
  thread stop anyway, every request it held or queued gets a 503, `/health` answers 503 and new requests 503;
* a client that goes away (streamed or not) marks its request cancelled, and the row is freed before the
  next decode chunk;
* on SIGTERM uvicorn stops accepting, lets running requests finish for `timeout_graceful_shutdown` seconds,
  then the app's shutdown stops the loop (whatever is left gets a 503) and the process exits.

DvD (`make_app(vision=VisionPool)`, `serve.py --role=language`): a request's tiles go to vision servers
first (`dvd/vision_client.py`) and it is submitted to the loop with their features, so the running batch
decodes on while they are in flight; the model may then hold only its language part.

Sampling seeds are per request: token i of a request with seed s is drawn with the key fold_in(key(s), i),
so a seeded answer does not depend on what else shares the batch. Requests without a seed get one drawn
from the server's own generator (`seed=`). Images are read only from base64 `data:` URLs in the request.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import queue
import socket
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from flax import nnx

from internvl_jax.inference.chat import reply_text
from internvl_jax.inference.dvd.vision_client import VisionError, VisionPool, prompt_features
from internvl_jax.inference.engine import Engine, decode_carry, init_cache, row_keys, unrouted_stats, use_flash
from internvl_jax.inference.sampling import Sampling, settings_arrays
from internvl_jax.inference.openai_schema import BadRequest, Limits, parse

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
  """The decode loop is not running (stopped or failed): HTTP 503."""


@dataclasses.dataclass(eq=False)
class Request:
  id: str
  ids: np.ndarray
  pixels: np.ndarray | None
  sampling: Sampling
  seed: int  # any 64-bit integer
  max_tokens: int
  stop: tuple[str, ...]
  loop: asyncio.AbstractEventLoop
  out: asyncio.Queue  # ("text", all text so far) ... then ("end", reason) or ("error", status, message)
  cancelled: bool = False
  tokens: list = dataclasses.field(default_factory=list)
  reason: str | None = None  # stop | length | cancelled | error, once it has ended
  visual: dict | None = None  # visual tokens before / after Flash routing (engine.visual_stats), once prefilled
  features: np.ndarray | None = None  # DvD: the <IMG_CONTEXT> rows from a vision server, instead of pixels


Finished = collections.namedtuple("Finished", "id tokens reason")


def _seed_words(seed: int) -> tuple[int, int]:
  return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _held_back(text: str, stops) -> int:
  """Trailing characters a stream must not send yet, since the next token can still change them: an
  incomplete UTF-8 character (decoded as U+FFFD) or the beginning of a stop string."""
  n = len(text) - len(text.rstrip("\ufffd"))
  for s in stops:
    n = max([n] + [k for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])])
  return n


class Batcher:
  """The decode loop: admits queued requests into free cache rows and steps all running rows together."""

  def __init__(self, model, processor, *, max_batch: int = 8, max_len: int = 4096, flash: bool | None = None,
               chunk: int = 8):
    self.engine, self.state = Engine(model), nnx.state(model)
    self.flash = use_flash(model.cfg, flash)
    self.tok, self.cfg, self.template = processor.tokenizer, model.cfg, processor.template
    self.max_batch, self.max_len, self.chunk = max_batch, max_len, chunk
    self._eos = np.asarray([self.tok.eos_id, self.tok.pad_id], np.int32)
    self.pending: queue.Queue[Request | None] = queue.Queue()
    self.slots: list[Request | None] = [None] * max_batch  # the rows of the running batch
    self.finished: collections.deque[Finished] = collections.deque(maxlen=256)  # recent requests, newest last
    self.error: str | None = None  # why the loop stopped
    self._keys = jax.jit(row_keys)
    self._seeds = np.zeros((max_batch, 2), np.uint32)
    self._settings = [Sampling()] * max_batch
    self._batch = None  # (cache, tokens, seen) on the device, None until a request arrives or after a failure
    # GET /stats reads it from another thread: its keys exist from the start
    self.timing = collections.Counter(dict.fromkeys(("prefills", "prefill_s", "decode_chunks", "decode_s"), 0))
    self._lock = threading.Lock()  # orders submit() against the loop's last drain of the queue
    self._stopping = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True, name="decode-loop")
    self.thread.start()

  @property
  def alive(self) -> bool:
    return self.thread.is_alive() and not self._stopping.is_set()

  def submit(self, req: Request):
    with self._lock:
      if not self.alive:
        raise Unavailable(f"the decode loop is not running ({self.error or 'stopping'})")
      self.pending.put(req)

  def stop(self, timeout: float = 10.0):
    """Stop the loop after its current step; requests it still holds get a 503."""
    self._stopping.set()
    self.pending.put(None)  # wakes a loop that waits for work
    self.thread.join(timeout)

  # ---------------------------------------------------------------------------------------- the loop

  def _run(self):
    try:
      while not self._stopping.is_set():
        try:
          self._admit()
          self._step()
        except Exception as e:  # noqa: BLE001 - whatever broke, the loop must go on serving
          log.exception("decode loop error")
          self._fail_running(500, f"the decode step failed: {type(e).__name__}: {e}")
    finally:
      with self._lock:
        self.error = self.error or ("shutting down" if self._stopping.is_set() else "the decode loop stopped")
        self._fail_running(503, f"server unavailable: {self.error}")
        while True:
          try:
            req = self.pending.get_nowait()
          except queue.Empty:
            break
          if req is not None:
            self._fail(req, 503, f"server unavailable: {self.error}")

  def _admit(self):
    """Move queued requests into free rows; block for one when nothing is running."""
    slots = self.slots
    while None in slots and not self._stopping.is_set():
      try:
        req = self.pending.get(block=all(s is None for s in slots))
      except queue.Empty:
        return
      if req is None:
        continue
      if req.cancelled:
        self._cancelled(req)
        continue
      start = time.perf_counter()
      try:
        if req.features is not None:  # DvD: computed (and routed) by a vision server
          logits, one, rows = self.engine.prefill(self.state, [req.ids], None, self.max_len,
                                                  image_features=req.features)
        elif self.flash:  # the request is routed on its own tiles; its row holds the shortened prompt
          routed = self.engine.route(self.state, [req.ids], req.pixels)
          req.ids, req.visual = routed.rows[0], routed.stats[0]
          logits, one, rows = self.engine.prefill(self.state, [req.ids], None, self.max_len, features=routed.features)
        else:
          req.visual = unrouted_stats(req.ids, self.cfg)
          logits, one, rows = self.engine.prefill(self.state, [req.ids], req.pixels, self.max_len)
        words = np.asarray([_seed_words(req.seed)] * rows, np.uint32)
        first, first_seen, _ = self.engine.first_token(logits, [req.ids], self._keys(words, np.zeros(rows, np.int32)),
                                                       settings_arrays([req.sampling], rows))
      except Exception as e:  # noqa: BLE001 - this request fails, the batch is untouched
        log.exception("prefill of %s failed", req.id)
        self._fail(req, 500, f"prefill failed: {type(e).__name__}: {e}")
        continue
      req.pixels = req.features = None  # the tiles are in the cache now; don't hold them
      if self._batch is None:
        b = self.max_batch
        self._batch = (init_cache(self.cfg, b, self.max_len), jnp.zeros(b, jnp.int32),
                       jnp.zeros((b, self.cfg.text.vocab_size), bool))
      row = slots.index(None)
      slots[row] = req  # before join: should join fail, the failure handler sees this request too
      self._seeds[row], self._settings[row] = _seed_words(req.seed), req.sampling
      self._batch = self.engine.join(*self._batch, one, row, first, first_seen)
      self._advance(row, int(first[0]))
      self.timing.update(prefills=1, prefill_s=time.perf_counter() - start)

  def _step(self):
    slots = self.slots
    for row, req in enumerate(slots):
      if req is not None and req.cancelled:  # the client went away: free the row before computing for it
        slots[row] = None
        self._cancelled(req)
    running = [r for r in slots if r is not None]
    if not running:
      return
    active = np.array([r is not None for r in slots])
    counts = np.array([len(r.tokens) if r is not None else 0 for r in slots], np.int32)
    limits = np.array([r.max_tokens if r is not None else 0 for r in slots], np.int32)
    cache, tokens, seen = self._batch
    self._batch = None  # donated below: invalid if the step raises
    carry = decode_carry(tokens, cache, seen, active, counts, words=self._seeds)
    start = time.perf_counter()
    carry, chunk, _ = self.engine.decode(self.state, carry, settings_arrays(self._settings, self.max_batch), limits,
                                         self._eos, max(len(r.ids) + len(r.tokens) for r in running),
                                         steps=self.chunk)
    chunk = np.asarray(chunk)
    self._batch = (carry["cache"], carry["tokens"], carry["seen"])
    self.timing.update(decode_chunks=1, decode_s=time.perf_counter() - start)
    for row in np.flatnonzero(active):
      req = slots[row]
      for token in chunk[row]:
        if token < 0 or slots[row] is not req:  # the device drew no more, or a stop string ended the request
          break
        self._advance(row, int(token))

  def _advance(self, row: int, token: int):
    """Record one new token of the request in `row`; free the row when it is done."""
    req = self.slots[row]
    eos = token in self._eos
    if not eos:
      req.tokens.append(token)
    text, complete = reply_text(self.template, self.tok, req.tokens)
    hits = [text.index(s) for s in req.stop if s in text]
    if hits:
      text = text[:min(hits)]
    done = "stop" if eos or hits or complete else "length" if len(req.tokens) >= req.max_tokens else None
    if done is None:
      self._emit(req, ("text", text[:len(text) - _held_back(text, req.stop)]))
    else:
      self._emit(req, ("text", text))
      self._end(row, done)

  # ---------------------------------------------------------------------------------------- endings

  def _emit(self, req: Request, item):
    try:
      req.loop.call_soon_threadsafe(req.out.put_nowait, item)
    except RuntimeError:  # the request's event loop is gone (server shutting down)
      req.cancelled = True

  def _record(self, req: Request, reason: str):
    req.reason = reason
    self.finished.append(Finished(req.id, tuple(req.tokens), reason))

  def _end(self, row: int, reason: str):
    req, self.slots[row] = self.slots[row], None
    self._record(req, reason)
    self._emit(req, ("end", reason))

  def _cancelled(self, req: Request):
    self._record(req, "cancelled")
    self._emit(req, ("end", "cancelled"))  # ends the handler that still waits (its client has gone)

  def _fail(self, req: Request, status: int, message: str):
    self._record(req, "error")
    self._emit(req, ("error", status, message))

  def _fail_running(self, status: int, message: str):
    for row, req in enumerate(self.slots):
      if req is not None:
        self.slots[row] = None
        self._fail(req, status, message)
    self._batch = None


# -------------------------------------------------------------------------------------------- HTTP

def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
  kind = "invalid_request_error" if status < 500 else "server_error"
  return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _sse(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_body(http: HTTPRequest, limit: int) -> bytes:
  """The body, refused (413) as soon as it is known to exceed `limit` bytes: by its Content-Length, or
  while it streams in."""
  declared = http.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    raise BadRequest(f"request body of {declared} bytes is over the limit of {limit} (--max_request_bytes)", 413)
  chunks, size = [], 0
  async for chunk in http.stream():
    size += len(chunk)
    if size > limit:
      raise BadRequest(f"request body over the limit of {limit} bytes (--max_request_bytes)", 413)
    chunks.append(chunk)
  return b"".join(chunks)


async def _watch_disconnect(http: HTTPRequest, req: Request):
  """Mark `req` cancelled when its client goes away (the ASGI receive channel reports the disconnect)."""
  while True:
    message = await http.receive()
    if message["type"] == "http.disconnect":
      req.cancelled = True
      return


async def _next_event(req: Request, batcher: Batcher):
  while True:
    try:
      return await asyncio.wait_for(req.out.get(), timeout=2.0)
    except asyncio.TimeoutError:
      # The loop fails what it holds when it stops; this catches a request that slipped past it.
      if not batcher.thread.is_alive() and req.out.empty():
        return ("error", 503, f"server unavailable: {batcher.error}")


def make_app(model, processor, *, model_name: str = "internvl", max_batch: int = 8, max_len: int = 4096,
             max_tokens: int = 512, max_request_bytes: int = Limits.max_request_bytes,
             max_image_pixels: int = Limits.max_image_pixels, seed: int = 0, flash: bool | None = None,
             decode_chunk: int = 8, vision: VisionPool | None = None) -> FastAPI:
  """The app; its decode loop starts now and stops at the app's shutdown (uvicorn's lifespan). flash: route
  tiles through a Flash model's ViR router (default: the checkpoint's flash_mode); `usage` reports
  `prompt_tokens` after routing and, for every model, `visual_tokens` / `visual_tokens_before_routing`.
  decode_chunk: decode steps per dispatch (streams get tokens in bursts of this many).
  vision: DvD's language role (`dvd/vision_client.py`): every request's tiles go to these vision servers, and
  its prompt joins the batch once their features are back (the model may hold only its language part);
  a vision failure fails that request (503 down / saturated / no answer in time, 502 a bad reply)."""
  limits = Limits(max_len=max_len, max_tokens=max_tokens, max_request_bytes=max_request_bytes,
                  max_image_pixels=max_image_pixels)
  batcher = Batcher(model, processor, max_batch=max_batch, max_len=max_len, flash=flash, chunk=decode_chunk)
  seeds = np.random.default_rng(seed)  # for requests that bring none; used on the event loop only

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if vision is not None:
      await vision.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
    if vision is not None:
      await vision.close()

  app = FastAPI(title="internvl-jax", lifespan=lifespan)
  app.state.batcher, app.state.limits = batcher, limits
  check = functools.partial(parse, processor=processor, model_name=model_name, vocab_size=model.cfg.text.vocab_size,
                            limits=limits)

  @app.get("/health")
  def health():
    if not batcher.alive:
      return JSONResponse({"status": "unavailable", "reason": batcher.error or "stopping"}, status_code=503)
    out = {"status": "ok", "running": sum(r is not None for r in batcher.slots), "queued": batcher.pending.qsize()}
    return out if vision is None else {**out, "vision_servers": vision.status()}

  @app.get("/stats")
  def stats():
    """Seconds spent per stage since the start (the DvD benchmark reads them)."""
    return {"language": dict(batcher.timing), "vision": dict(vision.stats) if vision is not None else None}

  @app.get("/v1/models")
  def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "internvl-jax"}]}

  @app.post("/v1/chat/completions")
  async def completions(http: HTTPRequest):
    loop = asyncio.get_running_loop()
    try:
      body = await _read_body(http, limits.max_request_bytes)
      parsed = await loop.run_in_executor(None, check, body)
      seed = parsed.seed if parsed.seed is not None else int(seeds.integers(0, 2**63))
      req = Request(f"chatcmpl-{uuid.uuid4().hex[:24]}", parsed.sample["input_ids"], parsed.sample["pixel_values"],
                    parsed.sampling, seed, parsed.max_tokens, parsed.stop, loop, asyncio.Queue())
      if vision is not None and req.pixels is not None:  # decoding goes on meanwhile: the batch is not waiting
        if not batcher.alive:  # no vision work for a request that cannot be served
          raise Unavailable(f"the decode loop is not running ({batcher.error or 'stopping'})")
        req.ids, req.features, req.visual = await prompt_features(vision, req.id, req.ids, req.pixels,
                                                                  route=batcher.flash)
        req.pixels = None
      batcher.submit(req)
    except BadRequest as e:
      return _error(e.status, str(e), e.code)
    except VisionError as e:
      log.warning("request %s: %s", req.id, e)
      return _error(e.status, str(e))
    except Unavailable as e:
      return _error(503, str(e))
    base = {"id": req.id, "created": int(time.time()), "model": model_name}

    def usage():
      n = len(req.tokens)
      out = {"prompt_tokens": len(req.ids), "completion_tokens": n, "total_tokens": len(req.ids) + n}
      if req.visual is not None:
        out.update(visual_tokens=req.visual["visual_tokens_after"],
                   visual_tokens_before_routing=req.visual["visual_tokens_before"])
      return out

    if not parsed.stream:
      watcher = asyncio.create_task(_watch_disconnect(http, req))
      text = ""
      try:
        while (event := await _next_event(req, batcher))[0] == "text":
          text = event[1]
      finally:
        watcher.cancel()
        req.cancelled = req.reason is None  # we leave before the end only when the client left
      if event[0] == "error":
        return _error(event[1], event[2])
      return {**base, "object": "chat.completion", "usage": usage(),
              "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": event[1]}]}

    extra = {"usage": None} if parsed.include_usage else {}

    def chunk(delta, reason=None):
      return _sse({**base, "object": "chat.completion.chunk", **extra,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

    async def events():
      sent = ""
      try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await _next_event(req, batcher))[0] == "text":
          if len(event[1]) > len(sent):
            yield chunk({"content": event[1][len(sent):]})
            sent = event[1]
        if event[0] == "error":
          yield _sse({"error": {"message": event[2], "type": "server_error", "code": event[1]}})
        else:
          yield chunk({}, event[1])
          if parsed.include_usage:
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"
      finally:  # also reached when the client goes away: then free the row
        req.cancelled = req.reason is None

    return StreamingResponse(events(), media_type="text/event-stream")

  return app


def bind(host: str, port: int) -> socket.socket:
  """A listening socket (port 0: the OS picks one; read it with getsockname), to hand to uvicorn."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock
