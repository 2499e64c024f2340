"""Training entry point (SFT, MPO, GSPO, ViCO): not yet available."""
import sys

if __name__ == "__main__":
  sys.exit("train.py: not yet available")
