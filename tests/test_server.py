"""OpenAI-compatible server: answers equal `chat`, SSE streaming, HTTP 400 on bad input, a burst of 100
concurrent requests, and rows freed when a client goes away."""
import asyncio
import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

import internvl_jax as ij

MAX_LEN = 320


@pytest.fixture(scope="module")
def served(ckpt_dir):
  import uvicorn
  from internvl_jax.checkpoint import load_config
  from internvl_jax.server import make_app
  processor = ij.Processor.from_pretrained(str(ckpt_dir))
  model = ij.init_model(load_config(str(ckpt_dir))[0], seed=1)
  app = make_app(model, processor, model_name="tiny", max_batch=4, max_len=MAX_LEN, max_tokens=8)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}", app, model, processor
  server.should_exit = True
  thread.join(timeout=10)


def data_url(image: Image.Image) -> str:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def body(question, image=None, **kw):
  content = [{"type": "text", "text": question}]
  if image is not None:
    content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
  return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def test_health_and_models(served):
  import httpx
  url = served[0]
  assert httpx.get(f"{url}/health").json() == {"status": "ok"}
  assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"


def test_answer_equals_chat_and_stream_equals_answer(served):
  import httpx
  url, _, model, processor = served
  want = ij.chat(model, processor, "What is in the image?", images=[IMAGE], max_new_tokens=8)
  r = httpx.post(f"{url}/v1/chat/completions", json=body("What is in the image?", IMAGE), timeout=60)
  assert r.status_code == 200, r.text
  out = r.json()
  assert out["choices"][0]["message"]["content"].strip() == want
  assert out["usage"]["completion_tokens"] <= 8 and out["choices"][0]["finish_reason"] in ("stop", "length")
  chunks = []
  with httpx.stream("POST", f"{url}/v1/chat/completions", json=body("What is in the image?", IMAGE, stream=True),
                    timeout=60) as s:
    for line in s.iter_lines():
      if line.startswith("data: "):
        chunks.append(line[6:])
  assert chunks[-1] == "[DONE]"
  events = [json.loads(c) for c in chunks[:-1]]
  text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
  assert text == out["choices"][0]["message"]["content"]
  assert events[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


@pytest.mark.parametrize("payload,message", [
    (b"{not json", "malformed JSON"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "unknown fields"),
    ({"model": "tiny"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "only base64 data: URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     "only base64 data: URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     "cannot read image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     "invalid base64"),
    ({"messages": [{"role": "user", "content": "<image> where is it?"}]}, "placeholders"),
    ({"messages": [{"role": "user", "content": "long " * 400}]}, "exceeds the context"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature >= 0"),
])
def test_bad_requests_get_400(served, payload, message):
  import httpx
  url = served[0]
  kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
  r = httpx.post(f"{url}/v1/chat/completions", timeout=60, **kw)
  assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_burst_of_100_concurrent_requests(served):
  import httpx
  url, _, model, processor = served
  questions = [f"Question number {i}?" for i in range(5)]
  want = {q: ij.chat(model, processor, q, max_new_tokens=8) for q in questions}

  async def run():
    async with httpx.AsyncClient(timeout=120) as client:
      async def one(i):
        q = questions[i % 5]
        r = await client.post(f"{url}/v1/chat/completions", json=body(q))
        return q, r
      return await asyncio.gather(*(one(i) for i in range(100)))

  for q, r in asyncio.run(run()):
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == want[q]


def test_disconnected_stream_frees_its_row(served):
  import httpx
  url, app, _, _ = served
  batcher = app.state.batcher
  with httpx.stream("POST", f"{url}/v1/chat/completions",
                    json=body("Tell me everything.", stream=True, max_tokens=MAX_LEN - 100), timeout=60) as s:
    for line in s.iter_lines():
      if '"content"' in line:
        break
  deadline = time.time() + 30
  while any(r is not None for r in batcher.slots) and time.time() < deadline:
    time.sleep(0.05)
  assert all(r is None for r in batcher.slots)
  assert batcher.finished[-1][1] in ("cancelled", "length", "stop")
  r = httpx.post(f"{url}/v1/chat/completions", json=body("Still there?"), timeout=60)
  assert r.status_code == 200


def test_cancelled_request_leaves_the_batch(served):
  """What a disconnect does, deterministically: the row is freed at the next step, long before max_tokens."""
  _, app, _, processor = served
  from internvl_jax.generation import Sampling
  from internvl_jax.server import Request
  batcher = app.state.batcher

  async def run():
    sample_ = processor([{"role": "user", "content": "Go on."}])
    req = Request(sample_["input_ids"], None, Sampling(), MAX_LEN - 100, (), asyncio.get_running_loop(),
                  asyncio.Queue())
    batcher.submit(req)
    await req.out.get()
    req.cancelled = True
    for _ in range(600):
      if all(r is not req for r in batcher.slots) and not any(r is req for r in batcher.slots):
        break
      await asyncio.sleep(0.01)
    return req

  req = asyncio.run(run())
  assert all(r is not req for r in batcher.slots)
  assert len(req.tokens) < MAX_LEN - 100


def test_serve_py_one_shot_streams_the_chat_answer(ckpt_dir, tmp_path):
  import shutil
  import subprocess
  import sys
  from internvl_jax.checkpoint import load_config
  model = ij.init_model(load_config(str(ckpt_dir))[0], seed=2)
  ij.save_pretrained(model, str(tmp_path), layout="original")
  shutil.copy(ckpt_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  image = tmp_path / "cat.png"
  IMAGE.save(image)
  want = ij.chat(ij.from_pretrained(str(tmp_path)), ij.Processor.from_pretrained(str(tmp_path)), "What is this?",
                 images=[str(image)], max_new_tokens=6)
  out = subprocess.run([sys.executable, "serve.py", f"--checkpoint={tmp_path}", f"--image={image}",
                        "--prompt=What is this?", "--max_new_tokens=6"], check=True, capture_output=True, text=True)
  assert out.stdout.strip() == want
