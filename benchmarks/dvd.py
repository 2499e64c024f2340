"""DvD (paper §2.5, Table 18) at reduced scale: the same requests, sent at a fixed rate, to
  (a) one process (`serve.py --role=all`),
  (b) DvD: one vision process + one language process,
  (c) DvD with Flash routing (the ViR router on the vision side; `--flash=on`),
and, per configuration, requests/s, time to first token (p50/p95) and the time each stage spent.

  python benchmarks/dvd.py                                   # 448 / 896 / 1344 px images, 24 requests at 1/s
  python benchmarks/dvd.py --sizes=448,896 --requests=6 --rate=2

The model is a random-weight InternVL with 448 px tiles (256 tokens per tile, as released) and a narrow ViT and
LLM (--vision_width/layers, --text_width/layers) so that 2 CPU cores run it; one Flash checkpoint serves all
three (the router is only used in (c)). Image sizes tile as 1 (448 px), 4 + thumbnail (896) and 9 + thumbnail
(1344). Each configuration first answers one request of every size (compilation, not timed).

On one machine the two DvD processes share its cores; the stage table says what it would be on separate
machines: a pipeline's rate is bounded by its busiest stage, 1 / max(vision busy, language busy) per request,
where one process doing both serially gets 1 / (vision + language).
"""
from __future__ import annotations

import os
import sys

# This folder comes first on sys.path when a script here runs, and benchmarks/kernels.py would shadow the
# kernels package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import asyncio
import base64
import importlib.util
import io
import subprocess
import tempfile
import time

import httpx
import numpy as np
from PIL import Image

from internvl_jax.config import FlashConfig, InternVLConfig, TextConfig, VisionConfig

ROOT = os.path.dirname(_HERE)
_spec = importlib.util.spec_from_file_location("serve_benchmark", os.path.join(_HERE, "serve.py"))
serve_benchmark = importlib.util.module_from_spec(_spec)  # its checkpoint builder and streamed-request timer
_spec.loader.exec_module(serve_benchmark)


def model_config(args) -> InternVLConfig:
  vision = VisionConfig(hidden_size=args.vision_width, num_layers=args.vision_layers, num_heads=4,
                        intermediate_size=4 * args.vision_width, image_size=448)
  text = TextConfig(vocab_size=1024, hidden_size=args.text_width, num_layers=args.text_layers, num_heads=4,
                    num_kv_heads=2, head_dim=args.text_width // 4, intermediate_size=4 * args.text_width)
  # half of each request's tiles compressed, whatever the random router says (the released rule's quantile)
  return InternVLConfig(vision, text, image_token_id=0, flash=FlashConfig(relative_threshold=0.5,
                                                                          absolute_threshold=0.0))


def launch(*argv) -> tuple[subprocess.Popen, str]:
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *argv], stdout=subprocess.PIPE,
                          text=True, cwd=ROOT)
  line = proc.stdout.readline()
  if " on " not in line:
    proc.kill()
    sys.exit(f"serve.py {' '.join(argv)} did not start: {line!r}")
  return proc, line.split(" on ")[1].strip()


def wait_healthy(url: str, vision: bool):
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    try:
      h = httpx.get(f"{url}/health", timeout=5)
      if h.status_code == 200 and (not vision or all(s["up"] for s in h.json()["vision_servers"])):
        return
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  sys.exit(f"{url} was not healthy within 120 s")


def body(args, png: bytes) -> dict:
  url = "data:image/png;base64," + base64.b64encode(png).decode()
  return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": "Describe it in detail, please."}]}],
          "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}


async def drive(url: str, bodies: list[dict], rate: float):
  """Send bodies[i] at i / rate seconds; -> (wall seconds, [(send time, first-token stamps, tokens, end)])."""
  async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(bodies))) as client:
    t0 = time.perf_counter()

    async def at(i, b):
      await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
      return await serve_benchmark.one(client, url, b)

    results = await asyncio.gather(*(at(i, b) for i, b in enumerate(bodies)))
    return time.perf_counter() - t0, results


def run_config(name, args, ckpt, bodies, warm) -> dict:
  common = [f"--checkpoint={ckpt}", "--port=0", f"--max_batch={args.max_batch}", f"--max_len={args.max_len}",
            f"--max_new_tokens={args.max_tokens}", "--served_model_name=bench"]
  procs = []
  try:
    if name == "one process":
      proc, url = launch(*common, "--flash=off")
      procs.append(proc)
    else:
      vision, address = launch(f"--checkpoint={ckpt}", "--role=vision", f"--vision_max_batch={args.vision_max_batch}")
      procs.append(vision)
      proc, url = launch(*common, "--role=language", f"--vision_servers={address}",
                         f"--feature_dtype={args.feature_dtype}", "--flash=" + ("on" if "Flash" in name else "off"))
      procs.append(proc)
    wait_healthy(url, name != "one process")
    asyncio.run(drive(url, warm, rate=1e3))  # compiles every shape, sequentially enough to be alone
    before = httpx.get(f"{url}/stats").json()
    wall, results = asyncio.run(drive(url, bodies, args.rate))
    after = httpx.get(f"{url}/stats").json()
  finally:
    for p in procs:
      p.terminate()
      p.wait(timeout=60)
  diff = lambda side: {k: v - (before[side] or {}).get(k, 0) for k, v in (after[side] or {}).items()}
  language, vision = diff("language"), diff("vision")
  ttft = [s[0] - start for start, s, _, _ in results if s]
  ends = [end for *_, end in results]
  n = len(bodies)
  pct = lambda xs, q: 1e3 * float(np.percentile(xs, q))
  return {"config": name, "req/s": n / (max(ends) - min(start for start, *_ in results)), "wall s": wall,
          "ttft p50 ms": pct(ttft, 50), "ttft p95 ms": pct(ttft, 95),
          "vision ms/req": 1e3 * vision.get("remote_compute_s", 0.0) / n,
          "vision queue ms/req": 1e3 * vision.get("remote_queue_s", 0.0) / n,
          "transfer ms/req": 1e3 * vision.get("transfer_s", 0.0) / n,
          "feature KiB/req": vision.get("bytes_received", 0) / 1024 / n,
          "prefill ms/req": 1e3 * language.get("prefill_s", 0.0) / n,
          "decode ms/req": 1e3 * language.get("decode_s", 0.0) / n}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="448,896,1344", help="square image sizes, sent in turn")
  p.add_argument("--requests", type=int, default=24)
  p.add_argument("--rate", type=float, default=1.0, help="requests per second")
  p.add_argument("--max_tokens", type=int, default=16)
  p.add_argument("--max_batch", type=int, default=8)
  p.add_argument("--max_len", type=int, default=4096)
  p.add_argument("--vision_max_batch", type=int, default=16)
  p.add_argument("--feature_dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--vision_width", type=int, default=128)
  p.add_argument("--vision_layers", type=int, default=4)
  p.add_argument("--text_width", type=int, default=256)
  p.add_argument("--text_layers", type=int, default=4)
  p.add_argument("--configs", default="one process,DvD,DvD + Flash")
  args = p.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  scratch = tempfile.TemporaryDirectory()
  ckpt, _ = serve_benchmark.preset_checkpoint("dvd-bench", scratch.name, model_config(args))
  rng = np.random.default_rng(0)
  pngs = []
  for s in sizes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (s, s, 3), np.uint8)).save(buf, format="PNG")
    pngs.append(buf.getvalue())
  bodies = [body(args, pngs[i % len(pngs)]) for i in range(args.requests)]
  warm = [body(args, png) for png in pngs]
  cfg = model_config(args)
  tiles = {s: (1 if s <= 448 else (s // 448) ** 2 + 1) for s in sizes}
  print(f"model: ViT {args.vision_layers}x{args.vision_width}, LLM {args.text_layers}x{args.text_width}, 448 px tiles "
        f"of {cfg.tokens_per_tile} tokens; images {', '.join(f'{s} px ({tiles[s]} tiles)' for s in sizes)}; "
        f"{args.requests} requests at {args.rate:g}/s, {args.max_tokens} new tokens each; features as "
        f"{args.feature_dtype}: {cfg.tokens_per_tile * args.text_width * (2 if args.feature_dtype == 'bfloat16' else 4) / 1024:g} "
        f"KiB per tile")
  head = ["config", "req/s", "ttft p50 ms", "ttft p95 ms", "vision ms/req", "vision queue ms/req", "transfer ms/req",
          "feature KiB/req", "prefill ms/req", "decode ms/req"]
  rows = [run_config(name, args, ckpt, bodies, warm) for name in args.configs.split(",")]
  print(" | ".join(head))
  for row in rows:
    print(" | ".join(f"{row[h]:.1f}" if isinstance(row[h], float) else str(row[h]) for h in head), flush=True)
  print("\nseparate machines (estimate): a pipeline runs at 1 / its busiest stage's time per request")
  for row in rows:
    if row["config"] == "one process":
      print(f"  {row['config']}: prefill (ViT inside) + decode = {row['prefill ms/req'] + row['decode ms/req']:.1f} ms/req")
      continue
    v, lang = row["vision ms/req"], row["prefill ms/req"] + row["decode ms/req"]
    print(f"  {row['config']}: vision {v:.1f} ms/req, language {lang:.1f} ms/req -> up to "
          f"{1e3 / max(v, lang):.2f} req/s on two machines ({'vision' if v > lang else 'language'}-bound; "
          f"1 / (vision + language) = {1e3 / (v + lang):.2f} req/s)")
  print("  (stage times were measured while the processes shared this machine's cores: on machines of their own\n"
        "  each stage runs faster, so these rates are lower bounds)")
  scratch.cleanup()


if __name__ == "__main__":
  main()
