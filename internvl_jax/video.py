"""Video inputs (REFERENCE.md §4): which frames to take, decoding with PyAV, and the frame prefixes.

Each sampled frame becomes one 448 px tile (256 tokens) announced in the prompt as `Frame{i}: <image>` at
inference and `Frame-{i}: <image>` in training (the official training and inference code differ).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def inference_indices(num_frames: int, num_segments: int = 32, *, bound: tuple[float, float] | None = None,
                      fps: float = 1.0) -> np.ndarray:
  """The official `get_index`: midpoints of num_segments equal segments of [start, last frame]."""
  if num_frames <= 0:
    raise ValueError("the video has no frames")
  start, end = bound if bound else (-100000, 100000)
  start_idx = max(0, round(start * fps))
  end_idx = min(round(end * fps), num_frames - 1)
  seg = float(end_idx - start_idx) / num_segments
  return np.array([int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_segments)])


def training_indices(num_frames: int, video_length: int, sample: str = "rand",
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """The official `get_frame_indices` for 'rand' (a random frame per interval) and 'middle' (interval
  midpoints); short videos are padded with their last sampled frame up to num_frames."""
  if video_length <= 0:
    raise ValueError("the video has no frames")
  if sample not in ("rand", "middle"):
    raise ValueError(f"unknown frame sampling {sample!r} (expected 'rand' or 'middle')")
  n = min(num_frames, video_length)
  edges = np.linspace(0, video_length, n + 1).astype(int)
  ranges = [(edges[i], edges[i + 1] - 1) for i in range(n)]
  if sample == "middle":
    indices = [(a + b) // 2 for a, b in ranges]
  else:
    rng = rng or np.random.default_rng()
    if all(b > a for a, b in ranges):  # random.choice(range(a, b)) in the reference: b itself excluded
      indices = [int(rng.integers(a, b)) for a, b in ranges]
    else:  # the reference's fallback when an interval is a single frame
      indices = sorted(int(i) for i in rng.permutation(video_length)[:n])
  indices += [indices[-1]] * (num_frames - len(indices))
  return np.asarray(indices)


def frame_prompt(num_frames: int, *, training: bool = False) -> str:
  """The text that replaces a `<video>` placeholder."""
  if training:
    return "\n".join(f"Frame-{i + 1}: <image>" for i in range(num_frames))
  return "".join(f"Frame{i + 1}: <image>\n" for i in range(num_frames))


def count_frames(path: str) -> int:
  return len(_decode(path, None))


def read_frames(path: str, indices=None) -> list[Image.Image]:
  """Decode the frames at `indices` (all frames when None) as RGB PIL images, with PyAV."""
  return _decode(path, None if indices is None else [int(i) for i in indices])


def load_video(path: str, num_segments: int = 32) -> list[Image.Image]:
  """Inference sampling: decode once, pick `num_segments` frames by the midpoint rule."""
  frames = _decode(path, None)
  return [frames[i] for i in inference_indices(len(frames), num_segments)]


def _decode(path: str, indices: list[int] | None) -> list[Image.Image]:
  import av
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      wanted = None if indices is None else set(indices)
      frames = {}
      for i, frame in enumerate(container.decode(video=0)):
        if wanted is None or i in wanted:
          frames[i] = frame.to_image().convert("RGB")
        if wanted is not None and len(frames) == len(wanted):
          break
  except (av.FFmpegError, OSError, ValueError) as e:
    raise ValueError(f"cannot decode video {path}: {e}") from None
  if not frames:
    raise ValueError(f"cannot decode video {path}: no frames")
  if indices is None:
    return [frames[i] for i in sorted(frames)]
  missing = sorted(set(indices) - set(frames))
  if missing:
    raise ValueError(f"cannot decode video {path}: frames {missing[:5]} beyond its {max(frames) + 1} frames")
  return [frames[i] for i in indices]
