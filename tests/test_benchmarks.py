"""The benchmarks run on the CPU (kernels: XLA paths, small shapes; inference and Flash routing: tiny presets;
the planner: one model) and print their tables."""
import subprocess
import sys


def test_kernel_benchmark_runs():
  out = subprocess.run([sys.executable, "benchmarks/kernels.py", "--seq", "64", "--tokens", "16"], check=True,
                       capture_output=True, text=True).stdout
  assert "measured matmul peak" in out
  assert out.count("XLA (reference)") == 2 and out.count("ragged_dot (XLA)") == 2
  assert "x XLA" in out and "TFLOP/s" in out


def test_inference_benchmark_runs():
  out = subprocess.run([sys.executable, "benchmarks/inference.py", "--preset", "tiny-dense", "--steps", "2",
                        "--batches", "1,2", "--generate_steps", "3"], check=True, capture_output=True, text=True).stdout
  for dtype in ("float32", "bfloat16"):
    assert f"\n{dtype}:" in out and f"\n{dtype}, public generate" in out
  assert out.count("time ratio") == 2 and out.count("speed ratio") == 4
  assert out.count("first token ours") == 4 and out.count("of it); double-buffered single steps") == 4


def test_serve_benchmark_runs():
  """--preset: a random tiny checkpoint served by serve.py, text and one-image workloads at two concurrencies;
  every request runs its max_tokens (usage.completion_tokens)."""
  out = subprocess.run([sys.executable, "benchmarks/serve.py", "--preset=tiny-dense", "--requests=3",
                        "--concurrency=1,2", "--max_tokens=5", "--max_len=256"], check=True, capture_output=True,
                       text=True).stdout
  rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("text |", "image |"))]
  assert [(r[0], r[1]) for r in rows] == [("text", "1"), ("text", "2"), ("image", "1"), ("image", "2")], out
  assert all(float(r[4]) == 5.0 for r in rows), out  # tokens/request


def test_flash_benchmark_runs():
  out = subprocess.run([sys.executable, "benchmarks/flash.py", "--preset", "tiny-flash", "--tiles", "1,2",
                        "--decode-steps", "2"], check=True, capture_output=True, text=True).stdout
  assert "\n1 tile (1 in all)" in out and "\n2 tiles + thumbnail (3 in all)" in out
  assert out.count("  no routing ") == 2
  for case, compressed in (("none", "0/3"), ("half", "1/3"), ("all", "3/3")):  # the 3-tile table's routing
    assert f"  {case:10s} {compressed:>10s}" in out
  assert out.count("x no routing") == 6 and out.count("decode speed") == 6


def test_plan_benchmark_runs():
  out = subprocess.run([sys.executable, "benchmarks/plan.py", "--models", "InternVL3.5-1B", "--mesh", "fsdp:8"],
                       check=True, capture_output=True, text=True).stdout
  assert "InternVL3.5-1B" in out and "fits (" in out and "first call" in out


def test_vico_benchmark_runs():
  out = subprocess.run([sys.executable, "benchmarks/vico.py", "--rows", "2", "--length", "64", "--images", "1",
                        "--tiles", "2", "--slots", "2", "--steps", "1"], check=True, capture_output=True, text=True).stdout
  for name in ("SFT step", "reference forward alone", "consistency step", "router step (eq. 8-9, 3 variants)"):
    assert name in out
  assert "of the consistency step" in out


def test_dvd_benchmark_runs():
  """One process, DvD and DvD + Flash on real processes; the stage table and the separate-machines estimate.
  One 448 px tile per request: 256 rows of 64 bfloat16 values = 32 KiB of features."""
  out = subprocess.run([sys.executable, "benchmarks/dvd.py", "--sizes=448", "--requests=2", "--rate=4",
                        "--max_tokens=3", "--vision_layers=1", "--text_layers=1", "--text_width=64",
                        "--max_len=512"], check=True, capture_output=True, text=True).stdout
  rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if " | " in line}
  assert set(rows) == {"config", "one process", "DvD", "DvD + Flash"}, out
  for name in ("DvD", "DvD + Flash"):
    assert float(rows[name][4]) > 0 and float(rows[name][7]) == 32.0, rows[name]  # vision ms, feature KiB
    assert f"  {name}: vision " in out and "req/s on two machines" in out
  assert float(rows["one process"][4]) == 0.0 and float(rows["one process"][8]) > 0  # ViT inside the prefill
