"""The language server's side of DvD: a pool of vision servers it sends tiles to (`serve.py --role=language
--vision_servers=...`), on the HTTP server's asyncio loop (zmq.asyncio; one DEALER socket per server).

Stage two of the pipeline: while a request's tiles are on a vision server, the decode loop (server.py's
Batcher, its own thread) goes on with the running batch; the request joins it once its features are back.

* Choice: the least-loaded server that is up (fewest tiles in flight; ties in turn).
* Back-pressure: a server takes at most `max_inflight` tiles at once; a request that finds every server full
  waits, and at most `max_waiting` requests wait: the next one gets `Saturated` (HTTP 503) at once.
* Faults: a server is up from its connection's handshake to its disconnect (ZeroMQ's monitor events; ZMTP
  heartbeats, answered by libzmq's own threads, close a connection whose peer stops answering: a stopped
  process, a lost host or network). A server that goes away fails the requests it holds at once; one that is
  connected but never answers (a hang inside Python) fails them after `timeout`, and the tiles of requests
  given up on stay counted against it until it answers or goes; no server up fails a request at once
  (`Unavailable`, HTTP 503). ZeroMQ reconnects by itself, and the server takes requests again from its next
  handshake. A reply that breaks the schema or does not fit its request (wire.parse_features) fails that
  request (`BadFeatures`, HTTP 502) and is logged.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from internvl_jax.inference.dvd import wire
from internvl_jax.inference.engine import unrouted_stats, visual_stats
from internvl_jax.inference.openai_schema import BadRequest
from internvl_jax.model import vir
from internvl_jax.model.internvl import feature_count

log = logging.getLogger(__name__)


class VisionError(RuntimeError):
  status = 503


class Unavailable(VisionError):
  """No vision server could serve the request (none up, one went away, or no answer in time)."""


class Saturated(VisionError):
  """Every vision server is full and the waiting line is too."""


class BadFeatures(VisionError):
  """The vision server's reply was malformed, did not fit the request, or reported an error."""
  status = 502


@dataclasses.dataclass(eq=False)
class _Server:
  address: str
  sock: zmq.asyncio.Socket
  monitor: zmq.asyncio.Socket
  up: bool = False
  inflight: int = 0  # tiles
  answered: int = 0  # requests
  waiting: dict = dataclasses.field(default_factory=dict)  # request id -> (future, tiles, route, shape)
  late: dict = dataclasses.field(default_factory=dict)  # request id -> tiles: given up on, maybe still computed


class VisionPool:
  """addresses: the vision servers' ZeroMQ endpoints (tcp://host:port). cfg: the model's InternVLConfig (tile
  tokens, hidden size, router). feature_dtype: what the servers send ('bfloat16' halves float32's bytes)."""

  def __init__(self, addresses, cfg, *, feature_dtype: str = "bfloat16", timeout: float = 30.0,
               max_inflight: int = 64, max_waiting: int = 64, heartbeat: float = 1.0):
    if not addresses:
      raise ValueError("a VisionPool needs at least one vision server address")
    if feature_dtype not in wire.DTYPES:
      raise ValueError(f"feature_dtype must be one of {', '.join(wire.DTYPES)}, got {feature_dtype!r}")
    self.addresses, self.cfg, self.feature_dtype = list(addresses), cfg, feature_dtype
    self.timeout, self.max_inflight, self.max_waiting, self.heartbeat = timeout, max_inflight, max_waiting, heartbeat
    self.servers: list[_Server] = []
    # GET /stats; every key present from the start, so that reading it from another thread never sees it grow
    self.stats = collections.Counter(dict.fromkeys(
        ("requests", "tiles", "bytes_sent", "bytes_received", "wait_s", "remote_queue_s", "remote_batch_s",
         "remote_compute_s", "transfer_s", "malformed", "saturated"), 0))
    self._turn = 0
    self._queued = 0
    self._tasks: list[asyncio.Task] = []

  async def start(self):
    """Create the sockets and their reader and monitor tasks on the running loop (the app's startup)."""
    self.ctx = zmq.asyncio.Context()
    self._room = asyncio.Condition()
    self.servers, self._tasks, self._queued = [], [], 0
    for address in self.addresses:
      sock = self.ctx.socket(zmq.DEALER)
      ms = int(self.heartbeat * 1e3)
      for opt, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.HEARTBEAT_IVL, ms), (zmq.HEARTBEAT_TIMEOUT, 3 * ms),
                         (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 2000), (zmq.SNDHWM, self.max_inflight)):
        sock.setsockopt(opt, value)
      monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
      sock.connect(address)
      server = _Server(address, sock, monitor)
      self.servers.append(server)
      self._tasks += [asyncio.create_task(self._read(server)), asyncio.create_task(self._watch(server))]

  async def close(self):
    for task in self._tasks:
      task.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    for s in self.servers:
      s.up = False
      self._fail_all(s, Unavailable("the language server is shutting down"))
      s.sock.disable_monitor()
      s.monitor.close(0)
      s.sock.close(0)
    self.servers, self._tasks = [], []
    if getattr(self, "ctx", None) is not None:
      self.ctx.term()
      self.ctx = None

  def status(self) -> list[dict]:
    return [{"address": s.address, "up": s.up, "inflight_tiles": s.inflight, "waiting_requests": len(s.waiting),
             "answered": s.answered} for s in self.servers]

  # ------------------------------------------------------------------------------------------ requests

  async def features(self, rid: str, pixels: np.ndarray, *, route: bool) -> wire.Features:
    """The features of one request's tiles [tiles, H, W, 3] from a vision server; route: Flash routing."""
    deadline = time.monotonic() + self.timeout
    tiles = len(pixels)
    server = await self._place(tiles, deadline)
    future = asyncio.get_running_loop().create_future()
    server.waiting[rid] = (future, tiles, route, pixels.shape)
    server.inflight += tiles
    sent, start = False, time.perf_counter()
    try:
      frames = wire.tiles_message(rid, pixels, route=route, feature_dtype=self.feature_dtype)
      try:
        await server.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
      except zmq.ZMQError as e:  # zmq.Again: not connected (IMMEDIATE) or its send queue is full; nothing queued
        raise Unavailable(f"vision server {server.address} is not connected ({e})") from None
      sent = True
      try:
        out = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
      except asyncio.TimeoutError:
        raise Unavailable(f"vision server {server.address} did not answer request {rid} within "
                          f"{self.timeout:g} s") from None
    finally:
      server.waiting.pop(rid, None)
      if sent and (not future.done() or future.cancelled()) and server.up:  # wait_for cancels it on timeout
        # given up on (timeout, the client went away) while the server may still compute it: its tiles count
        # against the server's room until it answers or goes away, so timeouts cannot pile work on it
        server.late[rid] = tiles
      else:
        server.inflight -= tiles
      await self._wake()
    wait = time.perf_counter() - start
    q, c = float(out.timing.get("queue_s", 0.0)), float(out.timing.get("compute_s", 0.0))
    share = tiles / max(tiles, int(out.timing.get("batch_tiles", tiles)))
    # wait_s: send to reply; remote_queue_s + remote_batch_s of it were on the vision server after it read the
    # request (its batch's whole time), the rest (transfer_s) is the network and the server's receive queue;
    # remote_compute_s is this request's share of its batch (tiles), so it sums to the server's busy time.
    self.stats.update(requests=1, tiles=tiles, bytes_sent=pixels.nbytes, bytes_received=out.array.nbytes, wait_s=wait,
                      remote_queue_s=q, remote_batch_s=c, remote_compute_s=c * share,
                      transfer_s=max(0.0, wait - q - c))
    return out

  async def _place(self, tiles: int, deadline: float) -> _Server:
    """The server to send to: the least-loaded one that is up and has room; else wait (bounded)."""
    queued = False
    try:
      while True:
        up = [s for s in self.servers if s.up]
        if not up:
          raise Unavailable("no vision server is reachable (" + ", ".join(
              f"{s.address}: down" for s in self.servers) + "); text-only requests are still served")
        room = [s for s in up if s.inflight == 0 or s.inflight + tiles <= self.max_inflight]
        if room:
          self._turn += 1
          return min(room, key=lambda s: (s.inflight, (self.servers.index(s) - self._turn) % len(self.servers)))
        if not queued:
          if self._queued >= self.max_waiting:
            self.stats.update(saturated=1)
            raise Saturated(f"vision servers saturated: {sum(s.inflight for s in up)} tiles in flight and "
                            f"{self._queued} requests waiting (--vision_max_inflight, --vision_max_waiting)")
          queued, self._queued = True, self._queued + 1
        left = deadline - time.monotonic()
        if left <= 0:
          raise Unavailable(f"no vision server had room for {tiles} tiles within {self.timeout:g} s")
        async with self._room:
          try:
            await asyncio.wait_for(self._room.wait(), left)
          except asyncio.TimeoutError:
            pass
    finally:
      if queued:
        self._queued -= 1

  # ------------------------------------------------------------------------------------------ tasks

  async def _read(self, server: _Server):
    while True:
      frames = [f.buffer for f in await server.sock.recv_multipart(copy=False)]
      try:
        self._reply(server, frames)
      except Exception:  # noqa: BLE001 - one bad reply must not end the reader: later ones would never arrive
        log.exception("vision server %s: failed to handle a reply", server.address)

  def _reply(self, server: _Server, frames):
    try:
      header, _ = wire.decode(frames)
      rid = header["id"]
    except wire.BadMessage as e:
      log.warning("vision server %s sent a malformed message, dropped: %s", server.address, e)
      self.stats.update(malformed=1)
      return
    entry = server.waiting.get(rid)
    if entry is None:
      if rid in server.late:
        server.inflight -= server.late.pop(rid)
        asyncio.ensure_future(self._wake())
      log.info("vision server %s answered request %s, which no longer waits", server.address, rid)
      return
    future, tiles, route, shape = entry
    if future.done():
      return
    try:
      tokens = vir.tile_tokens(self.cfg, shape) if route else (feature_count(self.cfg, shape) // tiles, 0)
      future.set_result(wire.parse_features(frames, rid=rid, tiles=tiles, dim=self.cfg.text.hidden_size,
                                            tokens=tokens, route=route, dtype=self.feature_dtype))
      server.answered += 1
    except wire.RemoteError as e:
      future.set_exception(BadFeatures(f"vision server {server.address} failed request {rid}: {e}"))
    except wire.BadMessage as e:
      log.warning("vision server %s: rejected its reply to request %s: %s", server.address, rid, e)
      self.stats.update(malformed=1)
      future.set_exception(BadFeatures(f"vision server {server.address} sent a bad reply: {e}"))
    except Exception as e:  # noqa: BLE001 - fail this request now rather than at its timeout
      log.exception("vision server %s: reply to request %s", server.address, rid)
      future.set_exception(BadFeatures(f"vision server {server.address}: reply to request {rid} failed: "
                                       f"{type(e).__name__}: {e}"))

  async def _wake(self):
    async with self._room:
      self._room.notify_all()

  async def _watch(self, server: _Server):
    while True:
      event = parse_monitor_message(await server.monitor.recv_multipart())["event"]
      if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        server.up = True
        log.info("vision server %s is up", server.address)
        async with self._room:
          self._room.notify_all()
      elif event == zmq.EVENT_DISCONNECTED and server.up:
        server.up = False
        log.warning("vision server %s went away; failing its %d requests", server.address, len(server.waiting))
        self._fail_all(server, Unavailable(f"vision server {server.address} went away mid-request"))
        server.inflight -= sum(server.late.values())  # what it had been given up on is gone with it
        server.late.clear()
        await self._wake()

  def _fail_all(self, server: _Server, error: Exception):
    for future, *_ in list(server.waiting.values()):
      if not future.done():
        future.set_exception(error)



async def prompt_features(pool: VisionPool, rid: str, ids: np.ndarray, pixels: np.ndarray, *, route: bool):
  """A request's prompt for the language side: its tiles' features from the pool, and its ids shortened as the
  router decided (Flash) -> (ids, features [image tokens, d], visual_stats)."""
  cfg = pool.cfg
  if feature_count(cfg, pixels.shape) is None:
    raise BadRequest(f"tiles of {pixels.shape[1]}x{pixels.shape[2]} px do not fit the ViT's patch grid")
  if route:
    try:
      vir.tile_tokens(cfg, pixels.shape)
    except ValueError as e:
      raise BadRequest(str(e)) from None
  out = await pool.features(rid, pixels, route=route)
  if out.compressed is None:
    return ids, out.array, unrouted_stats(ids, cfg)
  tokens = vir.tile_tokens(cfg, pixels.shape)
  short, _ = vir.compress_row(ids, out.compressed, cfg, first_tile=0, table_tiles=len(pixels), tokens=tokens)
  return short, out.array, visual_stats(len(pixels), int(out.compressed.sum()), *tokens)
