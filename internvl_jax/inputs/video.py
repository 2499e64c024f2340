"""Video inputs (REFERENCE.md §4): which frames to take, decoding with PyAV, and the frame prefixes.

Only the sampled frames become images: frames are counted from the container (or a decoding pass that
converts nothing), then decoded in order up to the last sampled one.

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
  """The number of frames: the container's count when it keeps one (mp4, avi), else a decoding pass that
  converts nothing (mkv, ts). A container's count can overstate what decodes; `sample_frames` copes."""
  import av
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      reported = container.streams.video[0].frames
  except (av.FFmpegError, OSError, ValueError) as e:
    raise ValueError(f"cannot decode video {path}: {e}") from None
  return reported if reported > 0 else _decode(path, set())[1]


def read_frames(path: str, indices=None) -> list[Image.Image]:
  """The frames at `indices` (all frames when None, in order) as RGB PIL images, with PyAV. Frames are
  decoded in order up to the last wanted one, but only the wanted ones become images."""
  if indices is None:
    images, n = _decode(path, None)
    return [images[i] for i in range(n)]
  indices = [int(i) for i in indices]
  images, n = _decode(path, set(indices))
  missing = sorted(set(indices) - set(images))
  if missing:
    raise ValueError(f"cannot decode video {path}: frames {missing[:5]} beyond its {n} frames")
  return [images[i] for i in indices]


def sample_frames(path: str, choose) -> list[Image.Image]:
  """The frames at `choose(number of frames)`. When the container's frame count overstates what decodes,
  the indices are chosen again from the real count rather than failing on a video that plays."""
  indices = [int(i) for i in choose(count_frames(path))]
  images, decoded = _decode(path, set(indices))
  if any(i not in images for i in indices):  # decoding ended early, so `decoded` is the real count
    return read_frames(path, choose(decoded))
  return [images[i] for i in indices]


def load_video(path: str, num_segments: int = 32) -> list[Image.Image]:
  """Inference sampling: `num_segments` frames by the midpoint rule."""
  return sample_frames(path, lambda n: inference_indices(n, num_segments))


def training_frames(path: str, num_frames: int, sample: str = "rand",
                    rng: np.random.Generator | None = None) -> list[Image.Image]:
  """Training sampling: `num_frames` frames by 'rand' or 'middle' (`training_indices`)."""
  return sample_frames(path, lambda n: training_indices(num_frames, n, sample, rng))


def _to_image(frame) -> Image.Image:
  return frame.to_image().convert("RGB")


def _decode(path: str, wanted: set[int] | None) -> tuple[dict[int, Image.Image], int]:
  """Decode in order, converting the frames in `wanted` (all when None) and stopping after the last of them
  (decoding to the end when there is none). -> ({index: image}, frames decoded)."""
  import av
  last = max(wanted) if wanted else None
  images, n = {}, 0
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      for n, frame in enumerate(container.decode(video=0), 1):
        if wanted is None or n - 1 in wanted:
          images[n - 1] = _to_image(frame)
        if n - 1 == last:
          break
  except (av.FFmpegError, OSError, ValueError) as e:
    raise ValueError(f"cannot decode video {path}: {e}") from None
  if n == 0:
    raise ValueError(f"cannot decode video {path}: no frames")
  return images, n
