"""Inputs: tile grids (official rule), pixel values (transformers' image processor), prompts, labels,
tokenizer checks, video frames, and bad input."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import internvl_jax as ij
from internvl_jax import zoo
from internvl_jax.inputs import dynamic_resolution as dr
from internvl_jax.inputs import video
from internvl_jax.inputs.conversation import INTERNVL_SYSTEM, THINKING_SYSTEM

# REFERENCE.md §4: the official candidate order for min 1, max 12 (CPython 3.11 set order, stable-sorted).
OFFICIAL_ORDER = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
                  (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
                  (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]


def official_grid(width, height, image_size=448):
  """REFERENCE.md §4 `find_closest_aspect_ratio`, transcribed over the official candidate list."""
  aspect, best_diff, best = width / height, float("inf"), (1, 1)
  for i, j in OFFICIAL_ORDER:
    diff = abs(aspect - i / j)
    if diff < best_diff:
      best_diff, best = diff, (i, j)
    elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
      best = (i, j)
  return best


@pytest.fixture(scope="session")
def processor(ckpt_dir):
  return ij.Processor.from_pretrained(str(ckpt_dir), tile_size=448, tokens_per_tile=256)


def ctx(n):
  return "<img>" + "<IMG_CONTEXT>" * n + "</img>"


# ------------------------------------------------------------------------------------------- tiling

def test_candidate_order_is_official():
  assert list(dr.candidate_grids(1, 12)) == OFFICIAL_ORDER


def test_tile_grid_random_sizes():
  rng = np.random.default_rng(0)
  for w, h in rng.integers(1, 4000, size=(400, 2)):
    assert ij.tile_grid(int(w), int(h)) == official_grid(int(w), int(h)), (w, h)


def test_tile_grid_every_tie():
  """Every pair of candidates with the same aspect ratio, at areas just below and above half the larger
  grid's canvas, and the exact cross-ratio ties such as (1, 2) vs (2, 1) at aspect 1.25."""
  cases = 0
  for a in OFFICIAL_ORDER:
    for b in OFFICIAL_ORDER:
      if a != b and a[0] * b[1] == a[1] * b[0] and a[0] * a[1] < b[0] * b[1]:
        half = 0.5 * 448 * 448 * b[0] * b[1]
        for k in (0.9, 1.1):
          scale = math.sqrt(k * half / (a[0] * a[1]))
          w, h = round(a[0] * scale), round(a[1] * scale)
          g = math.gcd(a[0], a[1])
          w, h = w - w % (a[0] // g), h - h % (a[1] // g)
          h = w * a[1] // a[0]
          assert ij.tile_grid(w, h) == official_grid(w, h), (a, b, w, h)
          cases += 1
  for w, h in [(5, 4), (500, 400), (1250, 1000), (7, 4), (9, 4), (5, 2), (11, 4), (13, 4)]:
    assert ij.tile_grid(w, h) == official_grid(w, h), (w, h)
    cases += 1
  assert cases == 2 * 7 + 8  # 7 same-ratio pairs among the candidates


def test_tile_grid_limits():
  assert ij.tile_grid(4000, 100, max_tiles=6) == (6, 1)
  assert ij.tile_grid(448, 448, min_tiles=4, max_tiles=4) == (2, 2)
  with pytest.raises(ValueError, match="positive"):
    ij.tile_grid(0, 10)


def test_dynamic_preprocess_layout():
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8))
  tiles = ij.dynamic_preprocess(image)
  cols, rows = ij.tile_grid(1000, 700)
  assert (cols, rows) == (3, 2) and tiles.shape == (cols * rows + 1, 448, 448, 3) and tiles.dtype == np.float32
  resized = np.asarray(image.resize((cols * 448, rows * 448), Image.BICUBIC), np.float32) / 255
  want = (resized[448:896, 896:1344] - dr.IMAGENET_MEAN) / dr.IMAGENET_STD  # row-major: tile 5 = (row 1, col 2)
  np.testing.assert_allclose(tiles[1 * cols + 2], want, atol=1e-6)
  thumb = (np.asarray(image.resize((448, 448), Image.BICUBIC), np.float32) / 255 - dr.IMAGENET_MEAN) / dr.IMAGENET_STD
  np.testing.assert_allclose(tiles[-1], thumb, atol=1e-6)
  assert ij.dynamic_preprocess(Image.new("RGB", (448, 448))).shape == (1, 448, 448, 3)  # no thumbnail for one tile


@pytest.mark.parametrize("size", [(700, 300), (448, 448), (1000, 500), (300, 900), (1600, 400), (2000, 1500)])
def test_pixels_match_transformers_image_processor(size):
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
  # The InternVL3.5-HF preprocessor_config: ImageNet mean/std (GotOcr2's own defaults are CLIP's).
  proc = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=12,
                                  size={"height": 448, "width": 448}, image_mean=dr.IMAGENET_MEAN.tolist(),
                                  image_std=dr.IMAGENET_STD.tolist())
  rng = np.random.default_rng(2)
  image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
  ref = proc(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = ij.dynamic_preprocess(image)
  assert ours.shape == ref.shape, f"{size}: transformers tiles into {ref.shape[0]} tiles, we into {ours.shape[0]}"
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_jpeg_augmentation_changes_pixels_not_size():
  image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8))
  out = dr.jpeg_reencode(image, np.random.default_rng(0))
  again = dr.jpeg_reencode(image, np.random.default_rng(0))
  assert out.size == image.size and np.array_equal(np.asarray(out), np.asarray(again))
  assert not np.array_equal(np.asarray(out), np.asarray(image))


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L"])
def test_image_modes_become_rgb(mode, tmp_path):
  image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert(mode)
  path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
  image.save(path)
  tiles = ij.dynamic_preprocess(str(path), max_tiles=1)
  want = dr.normalize([image.convert("RGB").resize((448, 448), Image.BICUBIC)])
  np.testing.assert_allclose(tiles, want, atol=1e-6)


def test_bad_images_name_the_file(tmp_path):
  good = tmp_path / "good.png"
  Image.new("RGB", (30, 30)).save(good)
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(good.read_bytes()[:40])
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"not an image at all")
  for path in (truncated, corrupt, tmp_path / "missing.png"):
    with pytest.raises(ValueError, match=str(path.name)):
      ij.dynamic_preprocess(str(path))
  with pytest.raises(ValueError, match="zero size"):
    ij.dynamic_preprocess(Image.new("RGB", (0, 10)))


# ------------------------------------------------------------------------------------------- prompts

def test_single_image_prompt(processor):
  out = processor([{"role": "user", "content": "What is this?"}], images=[Image.new("RGB", (448, 448))])
  want = (f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n<|im_start|>user\n{ctx(256)}\nWhat is this?"
          "<|im_end|>\n<|im_start|>assistant\n")
  assert processor.tokenizer.decode(out["input_ids"], skip_special_tokens=False) == want
  assert out["pixel_values"].shape == (1, 448, 448, 3) and out["num_tiles"].tolist() == [1]
  assert (out["input_ids"] == processor.tokenizer.image_token_id).sum() == 256


def test_thinking_prompt_and_pure_text(processor):
  out = processor([{"role": "user", "content": "Hi"}], thinking=True)
  text = processor.tokenizer.decode(out["input_ids"], skip_special_tokens=False)
  assert text == f"<|im_start|>system\n{THINKING_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert out["pixel_values"] is None and out["num_tiles"].size == 0


def test_multi_image_placeholders_and_tile_budget(processor):
  wide = Image.new("RGB", (1600, 400))
  out = processor([{"from": "system", "value": "sys"},
                   {"from": "human", "value": "<image>\nFirst. <image>\nSecond. <image>\nThird?"}],
                  images=[wide, wide, Image.new("RGB", (448, 448))])
  assert out["num_tiles"].tolist() == [4 + 1, 4 + 1, 1]  # 12 // 3 images = 4 tiles each, plus thumbnails
  want = (f"<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n{ctx(256 * 5)}\nFirst. {ctx(256 * 5)}\nSecond. "
          f"{ctx(256)}\nThird?<|im_end|>\n<|im_start|>assistant\n")
  assert processor.text([{"role": "system", "content": "sys"},
                         {"role": "user", "content": "<image>\nFirst. <image>\nSecond. <image>\nThird?"}],
                        images=[wide, wide, Image.new("RGB", (448, 448))]) == want
  parts = processor([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (448, 448))},
                                                  {"type": "text", "text": "Hi"}]}])
  assert processor.tokenizer.decode(parts["input_ids"], skip_special_tokens=False).endswith(
      f"user\n{ctx(256)}\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_several_images_without_placeholders_get_numbered(processor):
  text = processor.text([{"role": "user", "content": "Compare."}],
                        images=[Image.new("RGB", (448, 448)), Image.new("RGB", (448, 448))])
  assert f"user\nImage-1: {ctx(256)}\nImage-2: {ctx(256)}\nCompare.<|im_end|>" in text


def test_placeholder_mismatch_errors(processor):
  img = Image.new("RGB", (448, 448))
  with pytest.raises(ValueError, match=r"2 <image> placeholders \(in messages \[0, 2\]\) but 1 images"):
    processor([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "<image>"}], images=[img], train=True)
  with pytest.raises(ValueError, match="1 <image> placeholders .* but 2 images"):
    processor([{"role": "user", "content": "<image>"}], images=[img, img])
  with pytest.raises(ValueError, match="0 <image> placeholders .* but 1 images"):
    processor([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], images=[img], train=True)
  with pytest.raises(ValueError, match="message 1: images and videos belong in user messages"):
    processor([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>"}], images=[img])
  with pytest.raises(ValueError, match="message 0: unknown role 'robot'"):
    processor([{"role": "robot", "content": "x"}])


def test_training_labels_and_square_weights(processor):
  tok = processor.tokenizer
  out = processor([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red panda."},
                   {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "The answer is 42."}],
                  images=[Image.new("RGB", (448, 448))], train=True)
  ids, labels, w = out["input_ids"], out["labels"], out["loss_weights"]
  assert ids.shape == labels.shape == w.shape
  supervised = labels != -100
  assert tok.decode(labels[supervised], skip_special_tokens=False) == "A red panda.<|im_end|>The answer is 42.<|im_end|>"
  np.testing.assert_array_equal(labels[supervised], ids[supervised])
  text = tok.decode(ids, skip_special_tokens=False)
  assert text.endswith("<|im_start|>assistant\nThe answer is 42.<|im_end|>\n")  # no generation prompt in training
  # each assistant turn: its header and the final "\n" are masked
  starts = [i for i in range(len(ids)) if ids[i] == tok.token_id("<|im_start|>")]
  for s in starts:
    assert labels[s] == -100
  assert labels[-1] == -100 and tok.decode([ids[-1]], skip_special_tokens=False) == "\n"
  n = supervised.sum()
  np.testing.assert_allclose(w[supervised], 1 / math.sqrt(n))
  assert np.all(w[~supervised] == 0)


def test_pad_batch(processor):
  a = processor([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], train=True)
  b = processor([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}],
                images=[Image.new("RGB", (448, 448))], train=True)
  batch = ij.pad_batch([a, b], processor.tokenizer.pad_id, side="left")
  width = max(len(a["input_ids"]), len(b["input_ids"]))
  assert batch["input_ids"].shape == (2, width) and batch["pixel_values"].shape[0] == 1
  short = 0 if len(a["input_ids"]) < width else 1
  assert batch["attention_mask"][short, 0] == 0 and batch["labels"][short, 0] == -100
  assert batch["loss_weights"][short, 0] == 0


# ------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_checks(ckpt_dir, tmp_path):
  from tokenizers import Tokenizer, models
  tok = ij.Tokenizer.from_pretrained(str(ckpt_dir))
  bad = zoo.get("tiny-dense").replace(image_token_id=tok.image_token_id + 1)
  with pytest.raises(ValueError, match=rf"<IMG_CONTEXT> is id {tok.image_token_id} in the tokenizer but "
                                       rf"image_token_id={tok.image_token_id + 1}"):
    tok.check_model_config(bad)
  plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  plain.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="special tokens .*<img>"):
    ij.Tokenizer.from_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    ij.Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"added_tokens_decoder": {"7": {"content": "a"}}}, f)
  with pytest.raises(ValueError, match="token 'a' has id 7 there but 0 in tokenizer.json"):
    ij.Tokenizer.from_pretrained(str(tmp_path))


def test_original_layout_config_without_image_token_key(ckpt_dir, tmp_path):
  """Released original-layout configs have no img_context_token_id: the id comes from the tokenizer, and the
  processor's check against it passes."""
  import shutil
  shutil.copy(ckpt_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  with open(ckpt_dir / "config.json") as f:
    raw = json.load(f)
  assert "llm_config" in raw
  raw.pop("img_context_token_id")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(raw, f)
  proc = ij.Processor.from_pretrained(str(tmp_path))
  from internvl_jax.checkpoint.pretrained import load_config
  cfg, layout = load_config(str(tmp_path))
  assert layout == "original" and cfg.image_token_id == proc.tokenizer.image_token_id


# ------------------------------------------------------------------------------------------- markers, system

@pytest.mark.parametrize("marker", ["<IMG_CONTEXT>", "<img>", "</img>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_special_tokens_in_text_are_rejected(processor, marker):
  """Image markers and the chat template's control tokens: text holding them could forge a turn."""
  img = Image.new("RGB", (448, 448))
  with pytest.raises(ValueError, match=f"message 1: the text holds '{marker}'"):
    processor([{"role": "system", "content": "s"}, {"role": "user", "content": f"<image>\nlook {marker} here"}],
              images=[img])
  with pytest.raises(ValueError, match=f"message 0: the text holds '{marker}'"):
    processor([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": marker}]}])
  with pytest.raises(ValueError, match=f"message 1: the text holds '{marker}'"):
    processor([{"from": "human", "value": "hi"}, {"from": "gpt", "value": f"a{marker}b"}], train=True)
  with pytest.raises(ValueError, match=f"system= holds '{marker}'"):
    processor([{"role": "user", "content": "hi"}], system=marker)


def test_thinking_conflicts_with_a_system_prompt(processor):
  with pytest.raises(ValueError, match="thinking=True .* system="):
    processor([{"role": "user", "content": "Hi"}], thinking=True, system="Be brief.")
  with pytest.raises(ValueError, match=r"thinking=True .* system message \(message 0\)"):
    processor([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], thinking=True)
  assert THINKING_SYSTEM in processor.text([{"role": "user", "content": "Hi"}], thinking=True)


# ------------------------------------------------------------------------------------------- augmentation

def test_jpeg_augmentation_is_per_tile(processor, monkeypatch, tmp_path):
  """As the official build_transform: every tile (thumbnail included) and every video frame is re-encoded on
  its own, at its own quality, after tiling."""
  image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (700, 1000, 3), dtype=np.uint8))
  crops = dr.crop_tiles(image)
  assert len(crops) == 7  # 3 x 2 grid + thumbnail
  calls, original = [], dr.jpeg_reencode
  monkeypatch.setattr(dr, "jpeg_reencode", lambda im, rng: (calls.append(im.size), original(im, rng))[1])
  messages = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]
  out = processor(messages, images=[image], train=True, jpeg_augment=True, rng=np.random.default_rng(0))
  assert calls == [(448, 448)] * 7 and out["pixel_values"].shape == (7, 448, 448, 3)
  rng = np.random.default_rng(0)
  want = dr.normalize([original(c, rng) for c in crops])
  np.testing.assert_allclose(out["pixel_values"], want, atol=1e-6)
  plain = processor(messages, images=[image], train=True)["pixel_values"]
  assert not np.allclose(plain, out["pixel_values"])
  calls.clear()
  path = tmp_path / "clip.mp4"
  write_video(path)
  out = processor([{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Light."}],
                  videos=[str(path)], train=True, num_frames=3, jpeg_augment=True, rng=np.random.default_rng(0))
  assert calls == [(448, 448)] * 3 and out["pixel_values"].shape == (3, 448, 448, 3)


# ------------------------------------------------------------------------------------------- video

def write_video(path, n=20, size=64):
  import av
  with av.open(str(path), "w") as out:
    stream = out.add_stream("mpeg4", rate=10)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(n):
      frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * 12 % 256, np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def test_frame_indices():
  assert video.inference_indices(20, 4).tolist() == [2, 7, 12, 16]  # midpoints of [0, 19], official rounding
  assert video.training_indices(4, 20, "middle").tolist() == [2, 7, 12, 17]
  picked = video.training_indices(4, 20, "rand", np.random.default_rng(0))
  assert all(lo <= p < lo + 4 for p, lo in zip(picked, (0, 5, 10, 15)))
  assert video.training_indices(6, 3, "middle").tolist() == [0, 1, 2, 2, 2, 2]  # padded with the last frame
  assert video.frame_prompt(2) == "Frame1: <image>\nFrame2: <image>\n"
  assert video.frame_prompt(2, training=True) == "Frame-1: <image>\nFrame-2: <image>"


def test_video_prompt_and_frames(processor, tmp_path):
  path = tmp_path / "clip.mp4"
  write_video(path)
  out = processor([{"role": "user", "content": "What happens?"}], videos=[str(path)], num_segments=4)
  text = processor.tokenizer.decode(out["input_ids"], skip_special_tokens=False)
  frames = "".join(f"Frame{i}: {ctx(256)}\n" for i in range(1, 5))
  assert f"<|im_start|>user\n{frames}What happens?<|im_end|>" in text
  assert out["num_tiles"].tolist() == [1, 1, 1, 1]
  means = out["pixel_values"].mean(axis=(1, 2)) * dr.IMAGENET_STD + dr.IMAGENET_MEAN
  np.testing.assert_allclose(means.mean(axis=1) * 255, [2 * 12, 7 * 12, 12 * 12, 16 * 12], atol=6)
  train = processor([{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "It brightens."}],
                    videos=[str(path)], train=True, num_frames=3, rng=np.random.default_rng(0))
  text = processor.tokenizer.decode(train["input_ids"], skip_special_tokens=False)
  frames = "\n".join(f"Frame-{i}: {ctx(256)}" for i in range(1, 4))
  assert f"<|im_start|>user\n{frames}\nWhat happens?<|im_end|>" in text


def all_frames(path):
  """The previous decoder: every frame to an image."""
  import av
  with av.open(str(path)) as container:
    return [np.asarray(f.to_image().convert("RGB")) for f in container.decode(video=0)]


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_only_wanted_frames_become_images(tmp_path, monkeypatch, ext):
  """Counting converts nothing (mp4 keeps a frame count, mkv needs a decoding pass) and only the wanted
  frames are converted; the frames are those a full decode gives."""
  import av
  path = tmp_path / f"clip.{ext}"
  write_video(path)
  full = all_frames(path)
  with av.open(str(path)) as container:
    assert (container.streams.video[0].frames > 0) == (ext == "mp4")
  converted, to_image = [], video._to_image
  monkeypatch.setattr(video, "_to_image", lambda f: (converted.append(1), to_image(f))[1])
  assert video.count_frames(str(path)) == len(full) == 20 and not converted
  got = video.read_frames(str(path), [3, 3, 17, 0])
  assert len(converted) == 3
  for g, i in zip(got, [3, 3, 17, 0]):
    np.testing.assert_array_equal(np.asarray(g), full[i])
  converted.clear()
  got = video.load_video(str(path), 4)
  assert len(converted) == 4
  for g, i in zip(got, video.inference_indices(20, 4)):
    np.testing.assert_array_equal(np.asarray(g), full[i])
  assert [np.asarray(g).tolist() for g in video.read_frames(str(path))] == [f.tolist() for f in full]
  with pytest.raises(ValueError, match=r"frames \[20\] beyond its 20 frames"):
    video.read_frames(str(path), [2, 20])


def test_overstated_frame_count_resamples(tmp_path, monkeypatch):
  """A container count above what decodes: the indices are chosen again from the decoded count."""
  path = tmp_path / "clip.mp4"
  write_video(path)
  full = all_frames(path)
  monkeypatch.setattr(video, "count_frames", lambda p: 30)
  got = video.load_video(str(path), 4)
  for g, i in zip(got, video.inference_indices(20, 4)):
    np.testing.assert_array_equal(np.asarray(g), full[i])


def frame_levels(out):
  """Each frame tile's mean grey level (the test videos are flat frames at 12 x index)."""
  return (out["pixel_values"].mean(axis=(1, 2)) * dr.IMAGENET_STD + dr.IMAGENET_MEAN).mean(axis=1) * 255


def test_training_frame_count_is_drawn(processor, tmp_path):
  """num_frames unset: randint(8, 32) frames per video (REFERENCE.md §4), the count drawn first."""
  small = ij.Processor(processor.tokenizer, tile_size=56, tokens_per_tile=4)
  path = tmp_path / "clip.mp4"
  write_video(path, n=40, size=32)
  messages = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Light."}]
  seen = set()
  for seed in range(6):
    out = small(messages, videos=[str(path)], train=True, rng=np.random.default_rng(seed))
    n = int(np.random.default_rng(seed).integers(8, 33))
    assert 8 <= n <= 32 and out["num_tiles"].tolist() == [1] * n
    assert small.text(messages, videos=[str(path)], train=True, rng=np.random.default_rng(seed)).count("Frame-") == n
    seen.add(n)
  assert len(seen) > 1
  fixed = ij.Processor(processor.tokenizer, tile_size=56, tokens_per_tile=4, min_num_frames=5, max_num_frames=5)
  assert fixed(messages, videos=[str(path)], train=True)["num_tiles"].size == 5
  with pytest.raises(ValueError, match="min_num_frames"):
    ij.Processor(processor.tokenizer, min_num_frames=9, max_num_frames=8)


def test_training_frame_sampling_option(processor, tmp_path):
  small = ij.Processor(processor.tokenizer, tile_size=56, tokens_per_tile=4)
  path = tmp_path / "clip.mp4"
  write_video(path, size=32)
  messages = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Light."}]
  middle = small(messages, videos=[str(path)], train=True, num_frames=4, sample="middle")
  np.testing.assert_allclose(frame_levels(middle), [2 * 12, 7 * 12, 12 * 12, 17 * 12], atol=6)
  rand = small(messages, videos=[str(path)], train=True, num_frames=4, sample="rand", rng=np.random.default_rng(1))
  picked = video.training_indices(4, 20, "rand", np.random.default_rng(1))
  np.testing.assert_allclose(frame_levels(rand), picked * 12, atol=6)
  with pytest.raises(ValueError, match="unknown frame sampling 'uniform'"):
    small(messages, videos=[str(path)], train=True, sample="uniform")


def test_unreadable_video_names_the_file(processor, tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="cannot decode video .*broken.mp4"):
    processor([{"role": "user", "content": "?"}], videos=[str(bad)])
  with pytest.raises(ValueError, match="cannot decode video .*absent.mp4"):
    video.load_video(str(tmp_path / "absent.mp4"))
