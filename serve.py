"""Serve InternVL: one-shot answers streamed to stdout, or an OpenAI-compatible HTTP server.

  python serve.py --checkpoint=/data/InternVL3_5-1B --image=cat.jpg --prompt="What is this?"
  python serve.py --checkpoint=/data/InternVL3_5-1B --port=8000      # POST /v1/chat/completions
  python serve.py --checkpoint=/data/InternVL3_5-1B --port=0         # the OS picks the port; the first line says it
  python serve.py --checkpoint=runs/digits --image=digit.png --prompt="Which digit is this?"   # a train.py run

DvD (paper §2.5): vision and language on separate processes (or machines), features sent over ZeroMQ:
  python serve.py --checkpoint=/data/InternVL3_5-8B --role=vision --vision_bind=tcp://0.0.0.0:5555
  python serve.py --checkpoint=/data/InternVL3_5-8B --role=language --port=8000 \
      --vision_servers=tcp://vision-0:5555,tcp://vision-1:5555
"""
import os
import signal
import sys
import threading

import jax.numpy as jnp
from absl import app, flags

import internvl_jax as ij

FLAGS = flags.DEFINE_string("checkpoint", None, "checkpoint folder (original or transformers layout), or a train.py "
                            "workdir (its export/ folder is used)", required=True)
flags.DEFINE_string("prompt", None, "one-shot mode: the question")
flags.DEFINE_multi_string("image", [], "one-shot mode: image file(s)")
flags.DEFINE_string("video", None, "one-shot mode: a video file")
flags.DEFINE_boolean("thinking", False, "use the thinking-mode system prompt")
flags.DEFINE_integer("port", None, "start the HTTP server on this port (0: any free port, printed at start)")
flags.DEFINE_string("host", "127.0.0.1", "server address")
flags.DEFINE_string("served_model_name", None, "server: the model id clients name (default: the checkpoint folder's "
                    "last path part); requests naming another model get a 404")
flags.DEFINE_integer("max_batch", 8, "server: rows of the running decode batch")
flags.DEFINE_integer("decode_chunk", 8, "server: decode steps per dispatch; a stream gets its tokens in bursts of "
                     "this many (1: one token per dispatch, more host round trips)")
flags.DEFINE_integer("max_len", 4096, "server: context length (prompt + answer) per request")
flags.DEFINE_integer("max_request_bytes", 8 << 20, "server: request body limit (larger bodies get a 413)")
flags.DEFINE_integer("max_image_pixels", 1 << 25, "server: pixels per image (width x height, read from the image "
                     "header before decoding; larger images get a 400)")
flags.DEFINE_float("shutdown_timeout", 30.0, "server: on SIGTERM, seconds that running requests get to finish")
flags.DEFINE_integer("seed", 0, "server: seeds the seeds of requests that bring none")
flags.DEFINE_integer("max_new_tokens", 512, "answer length limit (server: the default max_tokens)")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("top_k", 0, "0 = off")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and weight dtype")
flags.DEFINE_enum("role", "all", ["all", "vision", "language"], "DvD: 'vision' serves InternViT + projector (+ "
                  "router) to language servers over ZeroMQ; 'language' is the HTTP endpoint and sends tiles to "
                  "--vision_servers; 'all': one process")
flags.DEFINE_string("vision_bind", "tcp://127.0.0.1:0", "--role=vision: ZeroMQ endpoint to listen on (port 0: the OS "
                    "picks; the first line says it)")
flags.DEFINE_list("vision_servers", [], "--role=language: the vision servers' endpoints (least-loaded first)")
flags.DEFINE_integer("vision_max_batch", 16, "--role=vision: tiles per ViT batch, across requests")
flags.DEFINE_float("vision_max_wait_ms", 5.0, "--role=vision: how long a batch waits for more requests")
flags.DEFINE_enum("feature_dtype", "model", ["model", "bfloat16", "float32"], "--role=language: dtype of the "
                  "features on the wire ('model': the compute dtype, answers as --role=all; bfloat16 halves a "
                  "float32 model's bytes)")
flags.DEFINE_float("vision_timeout", 30.0, "--role=language: seconds a request waits for its features (then 503)")
flags.DEFINE_integer("vision_max_inflight", 64, "--role=language: tiles in flight per vision server")
flags.DEFINE_integer("vision_max_waiting", 64, "--role=language: requests that may wait for a full vision side "
                     "(more get a 503)")
flags.DEFINE_enum("flash", "auto", ["auto", "on", "off"], "InternVL3.5-Flash: route tiles through the ViR router "
                  "(64 or 256 tokens per tile); auto = the checkpoint's flash_mode")


def main(argv):
  del argv
  f = flags.FLAGS
  path = f.checkpoint
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "export")  # a train.py workdir: its released-layout export
    if not os.path.exists(os.path.join(path, "config.json")):
      sys.exit(f"serve.py: {f.checkpoint} is a train.py workdir without an export yet (written at the end of the run)")
  if f.role == "vision":
    return serve_vision(path)
  if f.role == "language" and (f.port is None or not f.vision_servers):
    sys.exit("serve.py: --role=language needs --port and --vision_servers")
  model = ij.from_pretrained(path, dtype=jnp.dtype(f.dtype), part="language" if f.role == "language" else "all")
  processor = ij.Processor.from_pretrained(path)
  flash = {"auto": None, "on": True, "off": False}[f.flash]
  if f.port is not None:
    import uvicorn
    from internvl_jax.inference.server import bind, make_app
    from internvl_jax.inference.dvd.vision_client import VisionPool
    name = f.served_model_name or os.path.basename(os.path.normpath(f.checkpoint))
    vision = None
    if f.role == "language":
      vision = VisionPool(f.vision_servers, model.cfg, timeout=f.vision_timeout, max_inflight=f.vision_max_inflight,
                          max_waiting=f.vision_max_waiting,
                          feature_dtype=model.cfg.dtype if f.feature_dtype == "model" else f.feature_dtype)
    app_ = make_app(model, processor, model_name=name, max_batch=f.max_batch, max_len=f.max_len,
                    max_tokens=f.max_new_tokens, max_request_bytes=f.max_request_bytes,
                    max_image_pixels=f.max_image_pixels, seed=f.seed, flash=flash, decode_chunk=f.decode_chunk,
                    vision=vision)
    sock = bind(f.host, f.port)
    host, port = sock.getsockname()[:2]
    print(f"serve.py: serving {name!r} on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    # uvicorn re-raises the SIGTERM it drained on after its shutdown; exit 0 then, not "killed by signal"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.Server(uvicorn.Config(app_, timeout_graceful_shutdown=f.shutdown_timeout)).run(sockets=[sock])
    return
  if f.prompt is None:
    sys.exit("serve.py: give --prompt (one-shot) or --port (server)")
  printed = [0]

  def show(text):
    sys.stdout.write(text[printed[0]:])
    sys.stdout.flush()
    printed[0] = len(text)

  ij.chat(model, processor, f.prompt, images=f.image or None, video=f.video, thinking=f.thinking,
          max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, stream=show,
          flash=flash)
  sys.stdout.write("\n")


def serve_vision(path):
  from internvl_jax.inference.dvd.vision_server import VisionServer
  f = flags.FLAGS
  model = ij.from_pretrained(path, dtype=jnp.dtype(f.dtype), part="vision")
  server = VisionServer(model, f.vision_bind, max_batch=f.vision_max_batch, max_wait=f.vision_max_wait_ms / 1e3)
  print(f"serve.py: vision server on {server.address}", flush=True)
  stop, signalled = threading.Event(), threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: (signalled.set(), stop.set()))
  server.serve_forever(stop)
  if not signalled.is_set():
    sys.exit("serve.py: the vision server's compute thread failed (its error is logged above)")


if __name__ == "__main__":
  app.run(main)
