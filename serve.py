"""Inference entry point (generation, OpenAI-compatible server, DvD): not yet available."""
import sys

if __name__ == "__main__":
  sys.exit("serve.py: not yet available")
