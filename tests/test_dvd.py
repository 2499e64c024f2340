"""DvD (paper §2.5): vision servers (`serve.py --role=vision`, real processes on 127.0.0.1) feed a language
server. Answers equal the single process token for token (dense, MoE, Flash routing; batched); the wire
schema rejects what does not fit; parts load only their tensors; a vision server that is down, dies
mid-request or hangs fails only the requests that need it (503 within the heartbeat, not the timeout), text
keeps being served, and it is used again once it is back; malformed replies are rejected (502) and never
reach the prompt; a saturated vision side refuses requests (503) instead of queueing without bound."""
import concurrent.futures
import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import internvl_jax as ij
from internvl_jax.inference.dvd import wire
from test_server import IMAGE, body, post, record, serve_py, start_server

WIDE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 150, 3), dtype=np.uint8))
TALL = Image.fromarray(np.random.default_rng(2).integers(0, 255, (120, 50, 3), dtype=np.uint8))
CASES = [("What is in the image?", IMAGE), ("Describe it.", WIDE), ("hi", None), ("And this one?", TALL),
         ("Describe the video frame by frame.", WIDE)]


def save(ckpt_dir, folder, **replace):
  from internvl_jax.checkpoint.pretrained import load_config
  cfg = load_config(str(ckpt_dir))[0].replace(**replace)
  ij.save_pretrained(ij.init_model(cfg, seed=3), str(folder), layout="original")
  shutil.copy(ckpt_dir / "tokenizer.json", folder / "tokenizer.json")
  return folder


@pytest.fixture(scope="module")
def checkpoints(ckpt_dir, tmp_path_factory):
  """name -> a tiny checkpoint with tokenizer: dense, MoE, and Flash (half of each request's tiles routed)."""
  from internvl_jax import zoo
  from internvl_jax.config import FlashConfig
  root = tmp_path_factory.mktemp("dvd")
  out = {}
  for name, replace in (("dense", {}), ("moe", {"text": zoo.get("tiny-moe").text}),
                        ("flash", {"flash": FlashConfig(relative_threshold=0.5, absolute_threshold=0.0)})):
    (root / name).mkdir()
    out[name] = save(ckpt_dir, root / name, **replace)
  return out


class Vision:
  """`serve.py --role=vision` as a process (`wait()` reads the address it bound); `restart()` binds the same
  address again."""

  def __init__(self, ckpt, address="tcp://127.0.0.1:0", *extra, wait=True):
    self.ckpt, self.extra = ckpt, extra
    self.proc = subprocess.Popen([sys.executable, "serve.py", f"--checkpoint={ckpt}", "--role=vision",
                                  f"--vision_bind={address}", *extra], stdout=subprocess.PIPE, text=True)
    if wait:
      self.wait()

  def wait(self):
    line = self.proc.stdout.readline()
    assert "vision server on tcp://" in line, (line, self.proc.poll())
    self.address = line.split(" on ")[1].strip()
    return self

  def restart(self):
    self.kill()
    self.__init__(self.ckpt, self.address, *self.extra)

  def signal(self, sig):
    self.proc.send_signal(sig)

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait(timeout=30)


def language_app(ckpt, addresses, **pool):
  from internvl_jax.inference.dvd.vision_client import VisionPool
  from internvl_jax.inference.server import make_app
  model = ij.from_pretrained(str(ckpt), part="language")
  vision = VisionPool(addresses, model.cfg, feature_dtype="float32", **pool)
  return make_app(model, ij.Processor.from_pretrained(str(ckpt)), model_name="tiny", max_batch=4, max_len=320,
                  max_tokens=8, vision=vision)


def all_app(ckpt):
  from internvl_jax.inference.server import make_app
  return make_app(ij.from_pretrained(str(ckpt)), ij.Processor.from_pretrained(str(ckpt)), model_name="tiny",
                  max_batch=4, max_len=320, max_tokens=8)


@contextlib.contextmanager
def serving(app):
  url, server, thread = start_server(app)
  try:
    yield url
  finally:
    server.should_exit = True
    thread.join(timeout=30)


def wait_up(url, n=1, timeout=60):
  import httpx
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    with contextlib.suppress(httpx.TransportError):
      servers = httpx.get(f"{url}/health", timeout=5).json().get("vision_servers", [])
      if sum(s["up"] for s in servers) >= n:
        return servers
    time.sleep(0.05)
  raise AssertionError(f"{n} vision servers were not up within {timeout} s")


def answers(url, app, cases, **kw):
  """Concurrent requests (they share the decode batch) -> [(status, tokens, usage)]."""
  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    replies = list(pool.map(lambda c: post(url, body(c[0], c[1], **kw)), cases))
  out = []
  for r in replies:
    assert r.status_code == 200, r.text
    out.append((record(app.state.batcher, r.json()["id"]).tokens, r.json()["usage"]))
  return out


# ------------------------------------------------------------------------------------------- wire

def test_wire_round_trip_and_what_it_rejects():
  feats = np.random.default_rng(0).standard_normal((12, 64)).astype(np.float32)
  bf16 = feats.astype(wire.DTYPES["bfloat16"])
  frames = [bytes(f) for f in wire.features_message("r1", bf16, compressed=[True, False], timing={"compute_s": 0.5})]
  got = wire.parse_features(frames, rid="r1", tiles=2, dim=64, tokens=(8, 4), route=True)
  assert got.array.dtype == bf16.dtype and np.array_equal(got.array, bf16) and got.compressed.tolist() == [True, False]
  assert got.timing == {"compute_s": 0.5} and len(frames[1]) == 12 * 64 * 2  # 2 bytes per bfloat16 value

  def bad(frames, match, **kw):
    args = {**dict(rid="r1", tiles=2, dim=64, tokens=(8, 4), route=True), **kw}
    with pytest.raises(wire.BadMessage, match=match):
      wire.parse_features([bytes(f) for f in frames], **args)

  header = json.loads(frames[0])
  edit = lambda **k: [json.dumps({**header, **k}).encode(), frames[1]]
  bad(frames, "names request 'r1'", rid="r2")  # the reply is for r1, we asked for r2
  bad(frames, r"shape \[12, 64\], expected \[16, 64\]", tokens=(8, 8))
  bad(frames, r"expected \[12, 32\]", dim=32)
  bad(edit(shape=[12, 65]), "is 1560 bytes, the payload 1536")
  bad(edit(dtype="int8"), "'dtype' is 'int8'")
  bad(edit(v=2), "'v' is 2")
  bad(edit(compressed=[True]), "must list 2 booleans")
  bad(edit(compressed=None), "'compressed' is missing")
  bad(frames, "routing was not asked for", route=False)
  bad([b"{not json", frames[1]], "header is not JSON")
  bad([b"[" * 60000, frames[1]], "RecursionError")
  bad(edit(dtype=[]), "'dtype' is \\[\\]")
  bad(edit(shape=[2**32, 2**32]), "36893488147419103232 bytes")  # no int64 wrap-around to 0
  bad(frames, "dtype bfloat16, asked for float32", dtype="float32")
  bad(edit(timing={"compute_s": float("nan")}), "'timing' must hold")
  bad(edit(timing={"batch_tiles": "many"}), "'timing' must hold")
  bad(frames[:1], "2 frames")
  nan = feats.copy()
  nan[3, 7] = np.nan
  bad(wire.features_message("r1", nan, compressed=[True, False]), "1 values are not finite")
  with pytest.raises(wire.RemoteError, match="out of memory"):
    wire.parse_features(wire.error_message("r1", "out of memory"), rid="r1", tiles=2, dim=64, tokens=(8, 4),
                        route=False)
  tiles = wire.tiles_message("r9", np.zeros((3, 56, 56, 3)), route=False, feature_dtype="float32")
  assert wire.parse_tiles(tiles).pixels.shape == (3, 56, 56, 3)
  with pytest.raises(wire.BadMessage, match="tiles must be float32"):
    wire.parse_tiles(wire.encode("tiles", "r9", np.zeros((3, 56, 56), np.float32), tiles=3, route=False,
                                 feature_dtype="float32"))


def test_parts_load_only_their_tensors(checkpoints, tmp_path):
  """A folder that holds only the vision (or only the language) tensors loads as that part and computes what
  the whole model computes; the whole model refuses it, naming the missing keys."""
  from flax import nnx
  from internvl_jax.checkpoint import safetensors_io
  src = checkpoints["flash"]
  full = ij.from_pretrained(str(src))
  ckpt = safetensors_io.Checkpoint(str(src))
  for part, keep in (("vision", lambda k: not k.startswith("language_model.")),
                     ("language", lambda k: k.startswith("language_model."))):
    folder = tmp_path / part
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    safetensors_io.write(str(folder), [(k, ckpt.shape(k), ckpt.get(k).dtype, lambda k=k: ckpt.get(k))
                                       for k in ckpt.keys() if keep(k)])
    model = ij.from_pretrained(str(folder), part=part)
    tops = {p[0] for p in dict(nnx.to_flat_state(nnx.state(model)))}
    assert tops == ({"language_model"} if part == "language" else
                    {"vision_model", "mlp1", "mlp2", "pooling_before_gating", "gating"})
    with pytest.raises(ValueError, match="missing keys"):
      ij.from_pretrained(str(folder))
    pixels = np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)
    if part == "vision":
      for a, b in zip(model.flash_features(pixels), full.flash_features(pixels)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      with pytest.raises(ValueError, match="holds only the vision part"):
        model.embed_inputs(np.zeros((1, 4), np.int32))
    else:
      ids = np.array([[1, 2] + [full.cfg.image_token_id] * 8 + [3]], np.int32)
      feats = full.image_features(pixels)
      want = full(ids, image_features=feats).logits
      np.testing.assert_array_equal(np.asarray(model(ids, image_features=feats).logits), np.asarray(want))
      with pytest.raises(ValueError, match="holds only the language part"):
        model.image_features(pixels)


def test_vision_server_batches_across_requests(checkpoints):
  """Requests that arrive within max_wait share one ViT batch (up to max_batch tiles; another tile shape waits
  for the next), and each gets exactly its own tiles' features."""
  import zmq
  from internvl_jax.inference.dvd.vision_server import VisionServer
  model = ij.from_pretrained(str(checkpoints["dense"]), part="vision")
  server = VisionServer(model, max_batch=6, max_wait=0.5)
  stop = threading.Event()
  thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
  thread.start()
  ctx = zmq.Context()
  sock = ctx.socket(zmq.DEALER)
  sock.connect(server.address)
  try:
    rng = np.random.default_rng(0)
    sent = {f"r{i}": rng.standard_normal((n, size, size, 3)).astype(np.float32)
            for i, (n, size) in enumerate([(2, 56), (3, 56), (1, 112), (3, 56)])}
    # first, what would have ended the socket's thread: an unhashable dtype; it answers an error and goes on
    sock.send_multipart([b'{"v": 1, "kind": "tiles", "id": "bad", "dtype": [], "shape": [1]}', b"\0" * 4])
    assert sock.poll(10_000)
    with pytest.raises(wire.RemoteError, match="rejected: header field 'dtype'"):
      wire.parse_features(sock.recv_multipart(), rid="bad", tiles=1, dim=64, tokens=(4, 0), route=False)
    for rid, pixels in sent.items():
      sock.send_multipart(wire.tiles_message(rid, pixels, route=False, feature_dtype="float32"))
    replies = {}
    for _ in sent:
      assert sock.poll(60_000), "no reply within 60 s"
      frames = sock.recv_multipart()
      rid = json.loads(frames[0])["id"]
      n, size = sent[rid].shape[:2]
      replies[rid] = wire.parse_features(frames, rid=rid, tiles=n, dim=64, tokens=((size // 28) ** 2, 0),
                                         route=False)
    batches = {rid: r.timing["batch_tiles"] for rid, r in replies.items()}
    assert batches == {"r0": 5, "r1": 5, "r2": 1, "r3": 3}, batches  # r3 would make 8 > max_batch
    for rid, pixels in sent.items():
      want = np.asarray(model.image_features(pixels))
      np.testing.assert_allclose(replies[rid].array, want.reshape(-1, want.shape[-1]), rtol=1e-5, atol=1e-6)
  finally:
    stop.set()
    thread.join(timeout=30)
    sock.close(0)
    ctx.term()


# ------------------------------------------------------------------------------------------- equality

@pytest.mark.parametrize("name", ["dense", "moe"])
def test_dvd_answers_equal_role_all(checkpoints, name):
  """Greedy, batched, images of 1..4 tiles and text: DvD with two vision servers (dense) or one (MoE) answers
  token for token as one process does; the least-loaded choice spreads the requests over both servers."""
  ckpt = checkpoints[name]
  visions = [Vision(ckpt, wait=False) for _ in range(2 if name == "dense" else 1)]  # they start side by side
  try:
    visions = [v.wait() for v in visions]
    app = language_app(ckpt, [v.address for v in visions])
    with serving(app) as url:
      wait_up(url, len(visions))
      got = answers(url, app, CASES)
      servers = wait_up(url, len(visions))
    reference = all_app(ckpt)
    with serving(reference) as url:
      want = answers(url, reference, CASES)
    assert got == want
    assert sum(s["answered"] for s in servers) == 4 and all(s["answered"] for s in servers), servers
    stats = app.state.batcher.timing
    assert stats["prefills"] == len(CASES) and stats["prefill_s"] > 0
  finally:
    for v in visions:
      v.kill()


def test_dvd_flash_routing_equals_role_all(checkpoints):
  """A Flash model: the vision server routes each request on its own tiles and sends 4 or 16 rows per tile; the
  language server shortens the prompt as routed. Tokens and the visual-token counts equal one process's."""
  ckpt = checkpoints["flash"]
  vision = Vision(ckpt)
  try:
    app = language_app(ckpt, [vision.address])
    with serving(app) as url:
      wait_up(url)
      got = answers(url, app, CASES)
    reference = all_app(ckpt)
    with serving(reference) as url:
      want = answers(url, reference, CASES)
    assert got == want
    assert any(u["visual_tokens"] < u["visual_tokens_before_routing"] for _, u in got), got
  finally:
    vision.kill()


# ------------------------------------------------------------------------------------------- faults

def test_vision_server_down_dead_mid_request_hung_and_back(checkpoints):
  """`serve.py --role=language` as a process, one vision server that we kill, stop and restart."""
  import httpx
  ckpt = checkpoints["dense"]
  vision = Vision(ckpt)
  lang = None
  try:
    lang, url = serve_py(f"--checkpoint={ckpt}", "--role=language", "--port=0", f"--vision_servers={vision.address}",
                         "--vision_timeout=60", "--feature_dtype=float32", "--max_len=320", "--served_model_name=tiny")
    wait_up(url)
    first = post(url, body(*CASES[0]), timeout=120)
    assert first.status_code == 200, first.text
    assert post(url, body("hi"), timeout=120).status_code == 200

    def timed(case):
      t0 = time.monotonic()
      r = post(url, body(*case), timeout=120)
      return r, time.monotonic() - t0

    # dies mid-request: the request is sent, the server is stopped before it answers, then killed
    vision.signal(signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(timed, CASES[0])
      time.sleep(1.0)
      vision.kill()
      r, seconds = pending.result()
    assert r.status_code == 503 and "went away mid-request" in r.json()["error"]["message"], r.text
    assert seconds < 10, seconds  # the disconnect, not --vision_timeout=60

    # down: image requests fail at once, text is served
    r, seconds = timed(CASES[1])
    assert r.status_code == 503 and "no vision server is reachable" in r.json()["error"]["message"], r.text
    assert seconds < 2, seconds
    assert post(url, body("hi"), timeout=120).status_code == 200

    # back on the same address: reconnected, the same answer as before
    vision.restart()
    wait_up(url)
    again = post(url, body(*CASES[0]), timeout=120)
    assert again.status_code == 200 and again.json()["choices"] == first.json()["choices"], again.text

    # hung (stopped, never killed): ZMTP heartbeats (3 s) drop it; it serves again once it resumes
    vision.signal(signal.SIGSTOP)
    r, seconds = timed(CASES[0])
    assert r.status_code == 503 and "went away mid-request" in r.json()["error"]["message"], r.text
    assert seconds < 15, seconds
    vision.signal(signal.SIGCONT)
    wait_up(url)
    assert post(url, body(*CASES[0]), timeout=120).json()["choices"] == first.json()["choices"]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
  finally:
    vision.kill()
    if lang is not None:
      lang.terminate()
      lang.wait(timeout=60)


class FakeVision:
  """A ZeroMQ ROUTER in a thread that answers 'tiles' messages with `reply(tiles) -> frames`; None holds the
  request until `release` is set, then it gets zero features of the right shape."""

  def __init__(self, reply):
    import zmq
    self.ctx = zmq.Context()
    self.sock = self.ctx.socket(zmq.ROUTER)
    port = self.sock.bind_to_random_port("tcp://127.0.0.1")
    self.address, self.reply = f"tcp://127.0.0.1:{port}", reply
    self.stop, self.release, self.held = threading.Event(), threading.Event(), []
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()

  def _run(self):
    while not self.stop.is_set():
      if self.sock.poll(20):
        identity, *frames = self.sock.recv_multipart()
        tiles = wire.parse_tiles(frames)
        out = self.reply(tiles)
        if out is None:
          self.held.append((identity, tiles))
        else:
          self.sock.send_multipart([identity, *[bytes(f) for f in out]])
      while self.release.is_set() and self.held:
        identity, t = self.held.pop(0)
        zeros = np.zeros((len(t.pixels) * 4, 64), np.float32)
        self.sock.send_multipart([identity, *[bytes(f) for f in wire.features_message(t.id, zeros)]])
    self.sock.close(0)
    self.ctx.term()

  def close(self):
    self.stop.set()
    self.thread.join(timeout=10)


def test_malformed_feature_messages_are_rejected_and_logged(checkpoints, caplog):
  """Replies of the wrong shape, with non-finite values, a broken header or another request's id fail the
  request (502, or 503 when nothing answers it in time) and are logged; none reaches the decode loop."""
  ckpt = checkpoints["dense"]
  d = 64
  kinds = iter(["shape", "nan", "header", "id"])

  def reply(t):
    kind, rows = next(kinds), len(t.pixels) * 4
    feats = np.ones((rows + (kind == "shape"), d), np.float32)
    if kind == "nan":
      feats[0, 0] = np.inf
    frames = wire.features_message(t.id if kind != "id" else "someone-else", feats)
    return [b"\xff garbage", frames[1]] if kind == "header" else frames

  fake = FakeVision(reply)
  try:
    app = language_app(ckpt, [fake.address], timeout=3.0)
    with caplog.at_level(logging.WARNING), serving(app) as url:
      wait_up(url)
      statuses = [post(url, body(*CASES[0])) for _ in range(4)]
      assert post(url, body("hi")).status_code == 200
    assert [r.status_code for r in statuses] == [502, 502, 503, 503], [r.text for r in statuses]
    assert "expected [" in statuses[0].json()["error"]["message"]
    assert "not finite" in statuses[1].json()["error"]["message"]
    assert "did not answer" in statuses[2].json()["error"]["message"]
    logged = caplog.text
    assert "rejected its reply" in logged and "malformed message" in logged
    assert app.state.batcher.timing["prefills"] == 1  # only the text request was prefilled
  finally:
    fake.close()


def holding_app(ckpt, **pool):
  """A FakeVision that holds every request, and a language app whose vision side holds one WIDE request."""
  fake = FakeVision(lambda t: None)
  processor = ij.Processor.from_pretrained(str(ckpt))
  tiles = len(processor([{"role": "user", "content": "x"}], images=[WIDE])["pixel_values"])
  return fake, language_app(ckpt, [fake.address], max_inflight=tiles, **pool)


def test_timed_out_requests_keep_their_room_until_answered(checkpoints):
  """A request the server does not answer in time gets a 503, but its tiles stay counted against the server
  (it may still compute them), so the next request is refused, not piled on; once the late answer arrives,
  the room is free again."""
  fake, app = holding_app(checkpoints["dense"], max_waiting=0, timeout=1.0)
  try:
    with serving(app) as url:
      wait_up(url)
      late = post(url, body("one", WIDE))
      assert late.status_code == 503 and "did not answer" in late.json()["error"]["message"], late.text
      refused = post(url, body("two", WIDE))
      assert refused.status_code == 503 and "saturated" in refused.json()["error"]["message"], refused.text
      assert len(fake.held) == 1
      fake.release.set()  # the late answer: dropped, but it frees the room
      deadline = time.monotonic() + 10
      while wait_up(url)[0]["inflight_tiles"] and time.monotonic() < deadline:
        time.sleep(0.05)
      assert post(url, body("three", WIDE)).status_code == 200
  finally:
    fake.close()


def test_saturated_vision_side_refuses_instead_of_queueing(checkpoints):
  """One request's tiles fill the vision server (max_inflight), one more may wait on the language side
  (max_waiting=1), the next is refused at once; once the server answers, the two admitted ones complete."""
  fake, app = holding_app(checkpoints["dense"], max_waiting=1, timeout=60.0)
  try:
    with serving(app) as url:
      wait_up(url)
      with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, body("one", WIDE))
        while not fake.held:
          time.sleep(0.01)
        second = pool.submit(post, url, body("two", WIDE))
        time.sleep(0.5)
        t0 = time.monotonic()
        third = post(url, body("three", WIDE))
        assert third.status_code == 503 and "saturated" in third.json()["error"]["message"], third.text
        assert time.monotonic() - t0 < 2
        assert len(fake.held) == 1  # the second waits on the language side, not in the vision server's queue
        chunks = app.state.batcher.timing["decode_chunks"]
        assert post(url, body("hi")).status_code == 200  # decoding goes on while features are in flight
        assert app.state.batcher.timing["decode_chunks"] > chunks and len(fake.held) == 1
        fake.release.set()
        assert first.result().status_code == 200, first.result().text
        assert second.result().status_code == 200, second.result().text
  finally:
    fake.close()
