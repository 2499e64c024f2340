"""The kernel benchmark runs on the CPU (XLA paths, small shapes) and prints its table."""
import subprocess
import sys


def test_kernel_benchmark_runs():
  out = subprocess.run([sys.executable, "benchmarks/kernels.py", "--seq", "64", "--tokens", "16"], check=True,
                       capture_output=True, text=True).stdout
  assert "measured matmul peak" in out
  assert out.count("XLA (reference)") == 2 and out.count("ragged_dot (XLA)") == 2
  assert "x XLA" in out and "TFLOP/s" in out
