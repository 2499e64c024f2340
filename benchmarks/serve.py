"""Serving throughput and latency: N streamed chat requests to a server on 127.0.0.1 at each concurrency,
the numbers vLLM's benchmark_serving reports: requests/s, output tokens/s, time to first token (TTFT) and
inter-token latency (ITL), p50 / p95.

  python benchmarks/serve.py --checkpoint=runs/digits --image=data/digits/images/scan_0003.png \\
      --prompt="Which digit is this?"            # starts `serve.py --port=0` of this checkout
  python benchmarks/serve.py --url=http://127.0.0.1:8000 ...    # an already running server

Each concurrency level first sends one request per concurrent client, not timed (the programs' compilation
is not counted), then --requests timed ones. Output tokens are counted as the streamed content chunks (one
per token, except where the server holds back a partial character or stop-string prefix). Greedy decoding,
--max_tokens per request (the digits model usually stops earlier, at its end-of-answer token).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np


def payload(args) -> dict:
  content = [{"type": "text", "text": args.prompt}]
  if args.image:
    with open(args.image, "rb") as f:
      url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    content.insert(0, {"type": "image_url", "image_url": {"url": url}})
  return {"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens, "stream": True}


async def one(client, url, body):
  t0 = time.perf_counter()
  stamps = []
  async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
    async for line in r.aiter_lines():
      if line.startswith("data: {"):
        choices = json.loads(line[6:]).get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
          stamps.append(time.perf_counter())
  return t0, stamps, time.perf_counter()


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
  ttft = [s[0] - start for start, s, _ in results if s]
  itl = [b - a for _, s, _ in results for a, b in zip(s, s[1:])]
  tokens = sum(len(s) for _, s, _ in results)
  pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")
  return {"concurrency": concurrency, "requests": requests, "req/s": requests / wall, "tok/s": tokens / wall,
          "tokens/request": tokens / requests, "ttft p50 ms": pct(ttft, 50), "ttft p95 ms": pct(ttft, 95),
          "itl p50 ms": pct(itl, 50), "itl p95 ms": pct(itl, 95)}


def start(args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "serve.py"), f"--checkpoint={args.checkpoint}", "--port=0",
         f"--max_batch={args.max_batch}", f"--max_new_tokens={args.max_tokens}"]
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
  p.add_argument("--image", help="a PNG sent with every request (base64 data: URL)")
  p.add_argument("--prompt", default="What is in the image?")
  p.add_argument("--max_tokens", type=int, default=16)
  p.add_argument("--max_batch", type=int, default=8, help="serve.py --max_batch when started here")
  p.add_argument("--concurrency", default="1,8")
  p.add_argument("--requests", type=int, default=64, help="timed requests per concurrency level")
  args = p.parse_args()
  if not args.url and not args.checkpoint:
    p.error("give --url or --checkpoint")
  proc, url = (None, args.url) if args.url else start(args)
  try:
    body = payload(args)
    print(f"server {url}; {args.requests} requests per level, max_tokens {args.max_tokens}, image {args.image}")
    head = ["concurrency", "req/s", "tok/s", "tokens/request", "ttft p50 ms", "ttft p95 ms", "itl p50 ms",
            "itl p95 ms"]
    print(" | ".join(head))
    for c in (int(x) for x in args.concurrency.split(",")):
      row = asyncio.run(level(url, body, c, args.requests))
      print(" | ".join(f"{row[h]:.2f}" if isinstance(row[h], float) else str(row[h]) for h in head), flush=True)
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=60)


if __name__ == "__main__":
  main()
