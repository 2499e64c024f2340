"""Generation: greedy tokens identical to transformers' generate (dense and MoE, with images, batch 1
and 3 with different prompt lengths), sampling controls, stopping, and chat."""
import numpy as np
import pytest
import torch

import internvl_jax as ij
from internvl_jax.generation import length_bucket, split_thinking
from conftest import IMAGE_TOKEN


def prompts(batch, seed=0):
  """Left-padded rows of different lengths; row i holds i % 3 images of 1-2 tiles (4 tokens per tile)."""
  rng = np.random.default_rng(seed)
  rows, tiles = [], 0
  for i in range(batch):
    n_img = (i % 2) + 1 if i < 2 else 0
    row = list(rng.integers(0, IMAGE_TOKEN, 2 + i))
    for j in range(n_img):
      row += [IMAGE_TOKEN] * 4 * (j + 1) + list(rng.integers(0, IMAGE_TOKEN, 1 + j))
      tiles += j + 1
    rows.append(row)
  width = max(map(len, rows))
  ids, mask = np.zeros((batch, width), np.int64), np.zeros((batch, width), np.int64)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask, rng.standard_normal((tiles, 56, 56, 3)).astype(np.float32)


def hf_generate(hf, ids, mask, pixels, **kw):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), max_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **kw)
  return out.numpy()[:, ids.shape[1]:]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_greedy_matches_transformers(hf_checkpoint, variant, batch):
  path, hf = hf_checkpoint(variant)
  ids, mask, pixels = prompts(batch)
  want = hf_generate(hf, ids, mask, pixels)
  got = ij.generate(ij.from_pretrained(path), ids, pixels, attention_mask=mask, max_new_tokens=32, eos_token_ids=())
  np.testing.assert_array_equal(got, want)
  assert len(set(want.reshape(-1).tolist())) >= 2  # not one token repeated throughout


def test_repetition_penalty_matches_transformers(hf_checkpoint):
  path, hf = hf_checkpoint("dense")
  ids, mask, pixels = prompts(3, seed=1)
  want = hf_generate(hf, ids, mask, pixels, repetition_penalty=1.5)
  got = ij.generate(ij.from_pretrained(path), ids, pixels, attention_mask=mask, max_new_tokens=32, eos_token_ids=(),
                    repetition_penalty=1.5)
  np.testing.assert_array_equal(got, want)


def test_long_prompt_in_a_quarter_octave_bucket_matches_transformers(hf_checkpoint):
  """150 tokens pad to the 160 bucket (not 256), and rows of 150 and 131 share it, left-padded."""
  path, hf = hf_checkpoint("dense")
  rng = np.random.default_rng(2)
  ids, mask = np.zeros((2, 150), np.int64), np.zeros((2, 150), np.int64)
  for i, n in enumerate((150, 131)):
    ids[i, 150 - n:], mask[i, 150 - n:] = rng.integers(0, IMAGE_TOKEN, n), 1
  with torch.no_grad():
    want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=16,
                       do_sample=False, eos_token_id=None, pad_token_id=0).numpy()[:, 150:]
  got = ij.generate(ij.from_pretrained(path), ids, attention_mask=mask, max_new_tokens=16, eos_token_ids=())
  np.testing.assert_array_equal(got, want)


def test_length_buckets_bound_padding_and_programs():
  sizes = [length_bucket(n) for n in range(1, 4097)]
  assert all(s >= n for n, s in enumerate(sizes, 1)) and sizes[375] == 384 and length_bucket(1) == 16
  assert all(s <= 1.25 * n for n, s in enumerate(sizes, 1) if n > 128)  # at most 25% padding
  assert sorted(set(sizes)) == [16, 32, 64, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
                                1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096]


@pytest.fixture(scope="module")
def dense(hf_checkpoint):
  return ij.from_pretrained(hf_checkpoint("dense")[0])


def test_sampling_controls(dense):
  ids, mask, pixels = prompts(3, seed=2)
  run = lambda **kw: ij.generate(dense, ids, pixels, attention_mask=mask, max_new_tokens=12, eos_token_ids=(), **kw)
  greedy = run()
  np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=3), greedy)
  np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6, seed=4), greedy)
  a, b = run(temperature=1.5, seed=5), run(temperature=1.5, seed=5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, run(temperature=1.5, seed=6)) and not np.array_equal(a, greedy)


def test_top_k_and_top_p_restrict_the_support():
  from internvl_jax.generation import sample
  import jax
  import jax.numpy as jnp
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  seen = jnp.zeros((2000, 4), bool)
  ones = jnp.ones((2000,))
  keys = jax.random.key(0)
  k2 = sample(logits, keys, seen, ones, jnp.full((2000,), 2, jnp.int32), ones, ones)
  assert set(np.asarray(k2).tolist()) == {0, 1}
  p = sample(logits, keys, seen, ones, jnp.zeros((2000,), jnp.int32), jnp.full((2000,), 0.7), ones)
  assert set(np.asarray(p).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: the first two tokens carry the mass
  counts = np.bincount(np.asarray(k2), minlength=4) / 2000
  assert abs(counts[0] - 0.5 / 0.8) < 0.05


def test_eos_stops_a_row_and_pads_it(dense):
  ids, mask, pixels = prompts(3, seed=2)
  free = ij.generate(dense, ids, pixels, attention_mask=mask, max_new_tokens=12, eos_token_ids=())
  eos = int(free[0, 4])
  got = ij.generate(dense, ids, pixels, attention_mask=mask, max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=-1)
  for row, ref in zip(got, free):
    hits = np.flatnonzero(ref == eos)
    stop = hits[0] + 1 if hits.size else 12
    np.testing.assert_array_equal(row[:stop], ref[:stop])
    assert np.all(row[stop:] == -1)


def test_generation_errors(dense):
  ids, mask, pixels = prompts(3)
  with pytest.raises(ValueError, match="count mismatch"):
    ij.generate(dense, ids, pixels[:-1], attention_mask=mask, max_new_tokens=2)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    ij.generate(dense, ids + 1000, pixels, attention_mask=mask, max_new_tokens=2)


def test_split_thinking():
  assert split_thinking("<think>\nstep 1\n</think>\n\nThe answer is 4.") == ("step 1", "The answer is 4.")
  assert split_thinking("No thinking here.") == ("", "No thinking here.")


def test_chat_decodes_generate(ckpt_dir):
  from PIL import Image
  proc = ij.Processor.from_pretrained(str(ckpt_dir))
  model = ij.init_model(ij.from_pretrained.__globals__["load_config"](str(ckpt_dir))[0], seed=0)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
  streamed = []
  text = ij.chat(model, proc, "What is in the image?", images=[image], max_new_tokens=8, stream=streamed.append)
  sample_ = proc([{"role": "user", "content": "What is in the image?"}], images=[image])
  ids = ij.generate(model, sample_["input_ids"][None], sample_["pixel_values"], max_new_tokens=8,
                    eos_token_ids=(proc.tokenizer.eos_id,), pad_token_id=proc.tokenizer.pad_id)[0]
  want = proc.tokenizer.decode([i for i in ids if i not in (proc.tokenizer.pad_id, proc.tokenizer.eos_id)],
                               skip_special_tokens=False)
  assert text == want.strip() and streamed and streamed[-1] == want
  cut = want[2:5]
  if cut:
    assert ij.chat(model, proc, "What is in the image?", images=[image], max_new_tokens=8, stop=[cut]) == \
        want[:want.index(cut)].strip()
  thinking, answer = ij.chat(model, proc, "Why?", thinking=True, max_new_tokens=4)
  assert isinstance(thinking, str) and isinstance(answer, str)


def test_bfloat16_decode_follows_the_full_forward(hf_checkpoint):
  """bfloat16 generation (KV cache stored as uint16 bits; on the CPU a single row decodes in a batch of two)
  scores every new token as a forward pass over the whole sequence without a cache does."""
  import jax
  model = ij.from_pretrained(hf_checkpoint("dense")[0], dtype="bfloat16")
  assert ij.generation.engine_for(model).min_batch == (2 if jax.default_backend() == "cpu" else 1)
  for batch in (1, 3):
    ids, mask, pixels = prompts(batch, seed=7)
    new, logps = ij.generate(model, ids, pixels, attention_mask=mask, max_new_tokens=16, eos_token_ids=(),
                             return_logps=True)
    tiles = np.cumsum([0] + [int(np.sum(r == IMAGE_TOKEN)) // 4 for r in ids])
    for i in range(batch):
      prompt = ids[i][mask[i] == 1]
      seq = np.concatenate([prompt, new[i]])[None]
      logits = model(seq, pixels[tiles[i]:tiles[i + 1]] if tiles[i + 1] > tiles[i] else None)
      full = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1:-1].astype(np.float32), axis=-1))
      np.testing.assert_allclose(logps[i], full[np.arange(16), new[i]], atol=0.05, err_msg=f"batch {batch} row {i}")
      top2 = np.sort(full, axis=-1)[:, -2:]
      clear = top2[:, 1] - top2[:, 0] > 0.1  # greedy picks the full forward's argmax wherever it is clear
      np.testing.assert_array_equal(new[i][clear], full.argmax(-1)[clear])
