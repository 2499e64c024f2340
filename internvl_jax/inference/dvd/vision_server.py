"""DvD's vision server (`serve.py --role=vision`): InternViT + projector (+ the ViR router of a Flash model) on
its own process, answering 'tiles' messages with features (wire.py) over a ZeroMQ ROUTER socket.

Stage one of the paper's three-stage pipeline, in two threads: the socket's thread receives requests (and
sends replies) while the compute thread runs the ViT, so the next requests' tiles arrive during a batch.
Tiles of requests that arrive within `max_wait` seconds of the first one are batched together, up to
`max_batch` tiles (a request larger than that runs alone), and run as one program whose tile count rounds up
to a power of two: log2(max_batch) + 1 programs per tile shape, and per larger power of two a lone request
needs (twice that for a Flash model: plain, and with the router). Requests with another tile shape wait for
the next batch. Each request is routed on its own tiles (`vir.route`: the quantile is over one request's
tiles), so its routing does not depend on what it was batched with, and a batch without routed requests runs
the plain projector only. At most `max_queue` received requests wait in the inbox and as many more set aside
for another tile shape; beyond that the socket's thread stops reading, ZeroMQ's queues fill and TCP pushes
back (the language side also bounds what it sends, see vision_client.py). A message is at most
`MAX_MESSAGE` bytes (ZeroMQ drops the connection of a peer that sends more). A request that fails here gets
an 'error' reply, and the server goes on; should the compute thread die, the server stops (its clients see
the disconnect) rather than keep a socket that never answers.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import zmq
from flax import nnx

from internvl_jax.inference.dvd import wire
from internvl_jax.model import vir

log = logging.getLogger(__name__)
_REPLIES = "inproc://vision-replies"
MAX_MESSAGE = 1 << 30  # bytes: 450 float32 tiles of 448 px


def _bucket(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class VisionServer:
  """model: an InternVL holding the vision part (`from_pretrained(..., part='vision')` or the whole model)."""

  def __init__(self, model, address: str = "tcp://127.0.0.1:0", *, max_batch: int = 16, max_wait: float = 0.005,
               max_queue: int = 64):
    self.cfg, self.max_batch, self.max_wait = model.cfg, max_batch, max_wait
    graphdef, self.state = nnx.split(model)
    self._plain = jax.jit(lambda s, x: (nnx.merge(graphdef, s).image_features(x),))
    self._routed = jax.jit(lambda s, x: nnx.merge(graphdef, s).flash_features(x))  # both projections + p0
    self.ctx = zmq.Context()
    self.sock = self.ctx.socket(zmq.ROUTER)
    self.sock.setsockopt(zmq.RCVHWM, max_queue)
    self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    self.sock.setsockopt(zmq.LINGER, 0)
    if address.endswith(":0"):  # the OS picks the port
      address = address[:-2] + ":*"
    self.sock.bind(address)
    self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    self.replies = self.ctx.socket(zmq.PULL)  # from the compute thread, which may not touch self.sock
    self.replies.bind(_REPLIES)
    self.max_queue = max_queue
    self.inbox: queue.Queue = queue.Queue(max_queue)  # (identity, Tiles, arrival time)

  def serve_forever(self, stop: threading.Event | None = None):
    """Serve until `stop` is set: this thread owns the socket, a second one computes."""
    stop = stop or threading.Event()
    compute = threading.Thread(target=self._compute, args=(stop,), daemon=True, name="vision-compute")
    compute.start()
    both, replies_only = zmq.Poller(), zmq.Poller()
    both.register(self.sock, zmq.POLLIN)
    for p in (both, replies_only):
      p.register(self.replies, zmq.POLLIN)
    try:
      while not stop.is_set() and compute.is_alive():
        events = dict((replies_only if self.inbox.full() else both).poll(100))
        while self.replies.poll(0):
          self.sock.send_multipart(self.replies.recv_multipart(copy=False), copy=False)
        if self.sock in events:
          self._receive()
    finally:
      stop.set()
      compute.join(timeout=30)
      self.replies.close(0)
      self.sock.close(0)
      self.ctx.term()

  def _receive(self):
    identity, *frames = self.sock.recv_multipart(copy=False)
    now = time.perf_counter()
    try:
      self.inbox.put_nowait((identity, wire.parse_tiles([f.buffer for f in frames]), now))
    except Exception as e:  # noqa: BLE001 - whatever a peer sends, the socket's thread goes on
      rid = _id_of(frames[0].bytes) if frames else "?"
      log.warning("vision server: rejected a message (request %s): %s: %s", rid, type(e).__name__, e)
      self.sock.send_multipart([identity, *wire.error_message(rid, f"rejected: {e}")])

  # ------------------------------------------------------------------------------------ compute thread

  def _compute(self, stop):
    out = self.ctx.socket(zmq.PUSH)
    out.connect(_REPLIES)
    held: list = []  # received, waiting for a batch of their tile shape
    try:
      while not stop.is_set():
        batch, held = self._collect(held, stop)
        for identity, msg in self._answer(batch):
          out.send_multipart([identity, *msg], copy=False)
    except Exception:  # noqa: BLE001 - the socket's thread sees this thread end and stops the server
      log.exception("vision server: the compute thread failed")
      raise
    finally:
      out.close(0)

  def _next(self, held, timeout):
    if held:
      return held.pop(0)
    try:
      return self.inbox.get(timeout=timeout)
    except queue.Empty:
      return None

  def _collect(self, held, stop):
    """A batch (requests of one tile shape, up to max_batch tiles, within max_wait of the first) and what is
    left over for the next ones, in arrival order."""
    first = None
    while first is None and not stop.is_set():
      first = self._next(held, 0.1)
    if first is None:
      return [], held
    batch, later = [first], []
    shape, tiles = first[1].pixels.shape[1:], len(first[1].pixels)
    deadline = first[2] + self.max_wait
    while tiles < self.max_batch:
      got = self._next(held, max(0.0, deadline - time.perf_counter()))
      if got is None:
        if time.perf_counter() >= deadline:
          break
        continue
      n = len(got[1].pixels)
      if got[1].pixels.shape[1:] != shape or tiles + n > self.max_batch:
        later.append(got)
        if tiles + n > self.max_batch or len(later) + len(held) >= self.max_queue:  # set aside: bounded too
          break
        continue
      batch.append(got)
      tiles += n
    return batch, later + held

  def _answer(self, batch) -> list:
    if not batch:
      return []
    start = time.perf_counter()
    pixels = np.concatenate([t.pixels for _, t, _ in batch])
    n = len(pixels)
    padded = np.zeros((_bucket(n),) + pixels.shape[1:], np.float32)
    padded[:n] = pixels
    try:
      run = self._routed if self.cfg.flash is not None and any(t.route for _, t, _ in batch) else self._plain
      out = [np.asarray(x) for x in jax.device_get(run(self.state, jnp.asarray(padded)))]
    except Exception as e:  # noqa: BLE001 - these requests fail, the server goes on
      log.exception("vision server: a batch of %d tiles failed", n)
      return [(identity, wire.error_message(t.id, f"{type(e).__name__}: {e}")) for identity, t, _ in batch]
    compute = time.perf_counter() - start
    replies, first = [], 0
    for identity, t, arrived in batch:
      k = len(t.pixels)
      timing = {"queue_s": start - arrived, "compute_s": compute, "batch_tiles": n}
      try:
        msg = self._features(t, out, first, k, timing)
      except Exception as e:  # noqa: BLE001
        log.exception("vision server: request %s failed", t.id)
        msg = wire.error_message(t.id, f"{type(e).__name__}: {e}")
      replies.append((identity, msg))
      first += k
    return replies

  def _features(self, t: wire.Tiles, out, first: int, k: int, timing) -> list:
    full = out[0][first:first + k]
    dtype = wire.DTYPES[t.feature_dtype]
    if not t.route:
      return wire.features_message(t.id, full.reshape(-1, full.shape[-1]).astype(dtype), timing=timing)
    if self.cfg.flash is None:
      raise ValueError("routing asked for, but this vision server's model has no ViR router (not a Flash model)")
    compressed, p0 = out[1][first:first + k], out[2][first:first + k]
    squeeze = vir.route(p0, self.cfg.flash)
    rows = [compressed[i] if s else full[i] for i, s in enumerate(squeeze)]
    return wire.features_message(t.id, np.concatenate(rows).astype(dtype), compressed=squeeze, timing=timing)


def _id_of(header: bytes) -> str:
  try:
    rid = json.loads(header).get("id")
    return rid if isinstance(rid, str) else "?"
  except Exception:  # noqa: BLE001
    return "?"
