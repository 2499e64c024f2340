"""Serving throughput and latency: N streamed chat requests to a server on 127.0.0.1 at each concurrency,
the numbers vLLM's benchmark_serving reports: requests/s, output tokens/s, time to first token (TTFT) and
inter-token latency (ITL), p50 / p95.

  python benchmarks/serve.py --checkpoint=runs/digits --image=data/digits/images/scan_0003.png \\
      --prompt="Which digit is this?"   # starts `serve.py --port=0` of this checkout; text and image workloads
  python benchmarks/serve.py --url=http://127.0.0.1:8000 ...    # an already running server
  python benchmarks/serve.py --preset=tiny-dense                 # random weights of a zoo shape, see below
  python benchmarks/serve.py --preset=InternVL3.5-1B --requests=16 --concurrency=1,8

--preset writes a random-weight checkpoint of that zoo shape (original layout, float32) to a temporary
folder, with a byte-level BPE tokenizer trained here and padded with filler tokens up to the model's vocab
(so that every sampled id decodes to text and is streamed), and runs two workloads: `text` (the prompt
alone) and `image` (the prompt with one 448 px noise PNG: 1 tile, no thumbnail). The answers have no
end-of-answer token in practice (random weights), so every request runs its --max_tokens.

Each concurrency level first sends one request per concurrent client, not timed (the programs' compilation
is not counted), then --requests timed ones. Output tokens are the server's `usage.completion_tokens`
(`stream_options.include_usage`); TTFT is the time to the first streamed content chunk, ITL the gaps
between content chunks (the server streams a chunk per token as its decode chunk is replayed, except where
it holds back a partial character or stop-string prefix: tokens come in bursts of --decode_chunk, so ITL's
p50 is near 0 and its p95 near one chunk's time), TPOT the time per output token after the first,
(end - first token) / (tokens - 1). Greedy decoding, --max_tokens per request.
"""
from __future__ import annotations

import os
import sys

# This folder comes first on sys.path when a script here runs, and benchmarks/kernels.py would shadow the
# kernels package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time

import httpx
import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import internvl_jax as ij
from internvl_jax import zoo
from internvl_jax.inputs.conversation import INTERNVL_SYSTEM


def payload(args, image) -> dict:
  content = [{"type": "text", "text": args.prompt}]
  if image:
    with open(image, "rb") as f:
      url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    content.insert(0, {"type": "image_url", "image_url": {"url": url}})
  return {"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens, "stream": True,
          "stream_options": {"include_usage": True}}


def preset_checkpoint(name: str, folder: str, cfg=None) -> tuple[str, str]:
  """A random-weight checkpoint of zoo shape `name` (or of `cfg`, saved as `name`) with a tokenizer built
  here; (checkpoint, image png)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["What is in the image? Describe it in detail, please.", INTERNVL_SYSTEM, "user assistant system"] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(["<think>", "</think>", "<img>", "</img>", "<IMG_CONTEXT>"])
  cfg = cfg or zoo.get(name)
  cfg = cfg.replace(image_token_id=tok.token_to_id("<IMG_CONTEXT>"), dtype="float32", param_dtype="float32")
  tok.add_tokens([f" w{i}" for i in range(tok.get_vocab_size(), cfg.text.vocab_size)])
  path = os.path.join(folder, name)
  ij.save_pretrained(ij.init_model(cfg, seed=0), path, layout="original")
  tok.save(os.path.join(path, "tokenizer.json"))
  image = os.path.join(folder, "noise.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), np.uint8)).save(image)
  return path, image


async def one(client, url, body):
  t0 = time.perf_counter()
  stamps = []
  async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
    tokens = 0
    async for line in r.aiter_lines():
      if line.startswith("data: {"):
        event = json.loads(line[6:])
        choices = event.get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
          stamps.append(time.perf_counter())
        tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
  return t0, stamps, tokens, time.perf_counter()


async def level(url, body, concurrency: int, requests: int):
  async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
    await asyncio.gather(*(one(client, url, body) for _ in range(concurrency)))  # warm-up
    gate = asyncio.Semaphore(concurrency)

    async def gated():
      async with gate:
        return await one(client, url, body)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated() for _ in range(requests)))
    wall = time.perf_counter() - t0
  ttft = [s[0] - start for start, s, _, _ in results if s]
  itl = [b - a for _, s, _, _ in results for a, b in zip(s, s[1:])]
  tpot = [(end - s[0]) / (n - 1) for _, s, n, end in results if s and n > 1]
  tokens = sum(n for _, _, n, _ in results)
  pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")
  return {"concurrency": concurrency, "requests": requests, "req/s": requests / wall, "tok/s": tokens / wall,
          "tokens/request": tokens / requests, "ttft p50 ms": pct(ttft, 50), "ttft p95 ms": pct(ttft, 95),
          "itl p50 ms": pct(itl, 50), "itl p95 ms": pct(itl, 95), "tpot p50 ms": pct(tpot, 50)}


def start(args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "serve.py"), f"--checkpoint={args.checkpoint}", "--port=0",
         f"--max_batch={args.max_batch}", f"--max_new_tokens={args.max_tokens}",
         f"--decode_chunk={args.decode_chunk}", f"--max_len={args.max_len}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=root)
  line = proc.stdout.readline()
  if " on http://" not in line:
    proc.kill()
    sys.exit(f"serve.py did not start: {line!r}")
  url = line.split(" on ")[1].strip()
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    try:
      if httpx.get(f"{url}/health", timeout=5).status_code == 200:
        return proc, url
    except httpx.TransportError:
      time.sleep(0.2)
  proc.kill()
  sys.exit("serve.py did not answer /health within 120 s")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--url", help="a running server; else one is started from --checkpoint")
  p.add_argument("--checkpoint")
  p.add_argument("--preset", help="a zoo shape with random weights (and a tokenizer built here) instead")
  p.add_argument("--image", help="a PNG sent with every request (base64 data: URL)")
  p.add_argument("--prompt", default="What is in the image?")
  p.add_argument("--max_tokens", type=int, default=16)
  p.add_argument("--max_batch", type=int, default=8, help="serve.py --max_batch when started here")
  p.add_argument("--decode_chunk", type=int, default=8, help="serve.py --decode_chunk when started here")
  p.add_argument("--max_len", type=int, default=2048, help="serve.py --max_len when started here")
  p.add_argument("--concurrency", default="1,8")
  p.add_argument("--requests", type=int, default=64, help="timed requests per concurrency level")
  args = p.parse_args()
  if sum(map(bool, (args.url, args.checkpoint, args.preset))) != 1:
    p.error("give one of --url, --checkpoint, --preset")
  workloads = {"text": None, "image": args.image} if args.image else {"text": None}
  scratch = tempfile.TemporaryDirectory()
  if args.preset:
    args.checkpoint, noise = preset_checkpoint(args.preset, scratch.name)
    workloads = {"text": None, "image": args.image or noise}
  proc, url = (None, args.url) if args.url else start(args)
  try:
    print(f"server {url} ({args.preset or args.checkpoint or 'running'}, decode_chunk {args.decode_chunk}, "
          f"max_batch {args.max_batch}); {args.requests} requests per level, max_tokens {args.max_tokens}")
    head = ["workload", "concurrency", "req/s", "tok/s", "tokens/request", "ttft p50 ms", "ttft p95 ms",
            "itl p50 ms", "itl p95 ms", "tpot p50 ms"]
    print(" | ".join(head))
    for workload, image in workloads.items():
      for c in (int(x) for x in args.concurrency.split(",")):
        row = {"workload": workload, **asyncio.run(level(url, payload(args, image), c, args.requests))}
        print(" | ".join(f"{row[h]:.2f}" if isinstance(row[h], float) else str(row[h]) for h in head),
              flush=True)
  finally:
    scratch.cleanup()
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=60)


if __name__ == "__main__":
  main()
