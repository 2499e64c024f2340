"""Generation: greedy tokens identical to transformers' generate (dense and MoE, with images, batch 1
and 3 with different prompt lengths), sampling controls, the sampled distributions (temperature, and top-k /
top-p against transformers' logits warpers, by χ² tests), stopping, and chat."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import internvl_jax as ij
from internvl_jax.inference import engine as engine_lib
from internvl_jax.inference.engine import length_bucket
from internvl_jax.inference.chat import split_thinking
from internvl_jax.inference.sampling import Sampling, settings_arrays
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
@pytest.mark.parametrize("variant", ["dense", "moe", "gpt_oss"])  # gpt_oss: 32 tokens reach far past its window of 8
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
  assert ij.inference.engine.engine_for(model).min_batch == (2 if jax.default_backend() == "cpu" else 1)
  for batch in (1, 3):
    ids, mask, pixels = prompts(batch, seed=7)
    new, logps = ij.generate(model, ids, pixels, attention_mask=mask, max_new_tokens=16, eos_token_ids=(),
                             return_logps=True)
    tiles = np.cumsum([0] + [int(np.sum(r == IMAGE_TOKEN)) // 4 for r in ids])
    for i in range(batch):
      prompt = ids[i][mask[i] == 1]
      seq = np.concatenate([prompt, new[i]])[None]
      logits = model(seq, pixels[tiles[i]:tiles[i + 1]] if tiles[i + 1] > tiles[i] else None).logits
      full = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1:-1].astype(np.float32), axis=-1))
      np.testing.assert_allclose(logps[i], full[np.arange(16), new[i]], atol=0.05, err_msg=f"batch {batch} row {i}")
      top2 = np.sort(full, axis=-1)[:, -2:]
      clear = top2[:, 1] - top2[:, 0] > 0.1  # greedy picks the full forward's argmax wherever it is clear
      np.testing.assert_array_equal(new[i][clear], full.argmax(-1)[clear])


# ------------------------------------------------------------------------------- sampling distributions

DRAWS = 40_000
# Each χ² statistic is compared with its quantile at this false-failure probability under the null (a correct
# sampler); the seeds are fixed, so a run is deterministic, and any seed fails with at most this chance per check
FALSE_FAIL = 1e-6


def draw_counts(logits, temperature, top_k, top_p, per_row_keys=False, seed=0):
  """DRAWS tokens from each row of logits [R, V] under that row's settings, in one jitted `sample` call
  -> counts [R, V]."""
  import jax
  import jax.numpy as jnp
  from internvl_jax.inference.sampling import sample
  logits = np.asarray(logits, np.float32)
  r, v = logits.shape
  rep = lambda a, dt: jnp.asarray(np.repeat(np.broadcast_to(np.asarray(a, dt), (r,)), DRAWS))
  key = jax.random.key(seed)
  if per_row_keys:
    key = jax.random.split(key, r * DRAWS)
  tokens = jax.jit(sample)(jnp.asarray(np.repeat(logits, DRAWS, axis=0)), key, jnp.zeros((r * DRAWS, v), bool),
                           rep(temperature, np.float32), rep(top_k, np.int32), rep(top_p, np.float32),
                           jnp.ones((r * DRAWS,), jnp.float32))
  return np.stack([np.bincount(row, minlength=v) for row in np.asarray(tokens).reshape(r, DRAWS)])


def assert_follows(counts, probs, what):
  """The drawn tokens are exactly the support of probs, and Pearson's χ² over it is below its 1 - FALSE_FAIL
  quantile."""
  from scipy.stats import chi2
  keep = probs > 0
  assert probs[keep].min() * DRAWS > 40, f"{what}: a kept token too rare to be sure to appear"  # P(miss) < e^-40
  np.testing.assert_array_equal(np.flatnonzero(counts), np.flatnonzero(keep), err_msg=f"{what}: support")
  if keep.sum() > 1:
    expected = DRAWS * probs[keep]
    stat = float(np.sum((counts[keep] - expected) ** 2 / expected))
    limit = chi2.isf(FALSE_FAIL, keep.sum() - 1)
    assert stat < limit, f"{what}: chi2 {stat:.1f} >= {limit:.1f}, counts {counts} vs probs {np.round(probs, 4)}"


LOGITS = np.array([-0.3, 1.2, -1.6, 0.4, 0.9, -1.1, 0.0, -0.8], np.float32)  # no two equal, not in index order


@pytest.mark.parametrize("per_row_keys", [False, True])
def test_temperature_sampling_follows_the_tempered_softmax(per_row_keys):
  """No filter (the path that skips the sorts): draws follow softmax(logits / T), with one key for the batch
  or one per row."""
  logits = np.stack([LOGITS, LOGITS])
  counts = draw_counts(logits, [0.7, 1.6], 0, 1.0, per_row_keys=per_row_keys)
  for row, t in zip(counts, (0.7, 1.6)):
    z = np.exp((LOGITS - LOGITS.max()) / t)
    assert_follows(row, z / z.sum(), f"temperature {t}")


def reference_probs(logits, temperature, top_k, top_p):
  """The distribution transformers' generate samples from: the warpers it adds, in its order (temperature,
  top-k, top-p; each only when it is not a no-op), then softmax; and the one documented difference: where
  tokens tie at the top-p cutoff, transformers keeps those its sort puts last and drops the rest, we keep
  all of them (as both do at the top-k cutoff), so the result does not depend on token ids."""
  from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
  scores = torch.tensor(logits, dtype=torch.float32)[None]
  tempered = TemperatureLogitsWarper(temperature)(None, scores) if temperature != 1.0 else scores
  scores = TopKLogitsWarper(top_k)(None, tempered) if top_k else tempered
  scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores
  cut = scores[torch.isfinite(scores)].min()
  scores = torch.where(tempered >= cut, tempered, -torch.inf)
  return scores.softmax(-1)[0].numpy().astype(np.float64)


DYADIC = np.log(np.array([0.25, 0.0078125, 0.03125, 0.5, 0.0625, 0.125, 0.015625, 0.0078125], np.float32))
TIED = np.array([0.5, 1.0, 0.2, 1.0, 1.6, -1.0, 1.0, 0.0], np.float32)
WARPER_CASES = {  # name: (logits, temperature, top_k, top_p)
    "top-p 1 in a batch that filters": (LOGITS, 0.7, 0, 1.0),
    "top-k": (LOGITS, 0.7, 3, 1.0),
    "top-k 1": (LOGITS, 1.3, 1, 1.0),
    "top-k beyond the vocabulary": (LOGITS, 1.0, 20, 1.0),
    "top-k with ties at the cutoff": (TIED, 1.0, 3, 1.0),
    # T=1.5 keeps 5 tokens, T=1 would keep 4: top-p acts on the tempered distribution
    "top-p after temperature": (LOGITS, 1.5, 0, 0.8),
    "top-k then top-p": (LOGITS, 0.8, 5, 0.7),
    "tiny top-p keeps the top token": (LOGITS, 1.0, 0, 1e-4),
    "top-p 0 keeps the top token (min_tokens_to_keep=1)": (LOGITS, 1.0, 0, 0.0),
    # exact float32 probabilities 1/2, 1/4, 1/8, ...: 0.5 + 0.25 reaches top_p exactly, so the third token goes
    "top-p reached exactly": (DYADIC, 1.0, 0, 0.75),
    # 1.6 (0.29) and two of the three 1.0s (0.16 each) reach 0.5: transformers keeps two of them, we keep all
    # three (see reference_probs)
    "top-p with ties at the cutoff": (TIED, 1.0, 0, 0.5),
}


def test_top_k_and_top_p_match_transformers_warpers():
  """Every case in one batch (one compiled program; every row takes the filtering path)."""
  cases = list(WARPER_CASES.items())
  logits, temperature, top_k, top_p = (np.array(c) for c in zip(*(v for _, v in cases)))
  counts = draw_counts(logits, temperature, top_k, top_p, seed=1)
  for row, (name, case) in zip(counts, cases):
    assert_follows(row, reference_probs(*case), name)


def whole_cache_copies(model, slack: int, monkeypatch) -> int:
  """Copies of a whole layer cache in the compiled batch-1 decode step of a 64-token cache whose row fills
  it (the span reaches the length asked for), with `slack` extra slots per cache. (At batch 2 this XLA
  made no such copies; at batch 1 four per cache array.)"""
  monkeypatch.setattr(engine_lib, "CACHE_SLACK", slack)
  engine, state = engine_lib.Engine(model), nnx.state(model)
  cache = engine_lib.init_cache(model.cfg, 1, 64)
  settings = settings_arrays([Sampling()], 1)
  args = (state, jnp.zeros(1, jnp.int32), cache, jnp.zeros((1, model.cfg.text.vocab_size), bool),
          jnp.ones(1, bool), jax.random.key(0), settings)
  hlo = engine._step.lower(*args, span=engine.span(cache, 63)).compile().as_text()
  t = model.cfg.text
  shape = rf"\[1,{t.num_kv_heads},({t.head_dim},{64 + slack}|{64 + slack},{t.head_dim})\]"
  return len(re.findall(rf"= \w+{shape}\S* copy\(", hlo))


def test_decode_step_updates_the_cache_in_place(dense, monkeypatch):
  """Attention reads a power-of-two span of the cache. When that span was the whole cache, XLA:CPU copied
  every layer's keys and values on every step (263 against 120 ms per step for the 1B shape at batch 1);
  the cache's CACHE_SLACK slots keep the span a slice of it."""
  slack = engine_lib.CACHE_SLACK
  assert slack > 0
  assert whole_cache_copies(dense, 0, monkeypatch) > 0  # the old layout: the compiler's copies are there
  assert whole_cache_copies(dense, slack, monkeypatch) == 0


def test_chunked_decoding_equals_step_by_step(dense):
  """Decoding `chunk_size` steps per dispatch changes nothing a caller sees: with sampling (seeded, top-k,
  repetition penalty), an eos id, a stop that ends a row mid-chunk, rows of different lengths and a
  max_new_tokens that is no multiple of the chunk, the ids, the log-probs and every stream call equal those
  of one step per dispatch (chunk_size=1: the host loop as it was)."""
  ids, mask, pixels = prompts(3, seed=2)
  kw = dict(attention_mask=mask, max_new_tokens=13, temperature=1.2, top_k=20, repetition_penalty=1.3, seed=7)
  free = ij.generate(dense, ids, pixels, eos_token_ids=(), chunk_size=1, **kw)
  eos = int(free[0, 6])

  def run(chunk):
    calls, stops = [], []

    def stop(row, new):
      stops.append((row, len(new)))
      return row == 1 and len(new) == 5
    got = ij.generate(dense, ids, pixels, eos_token_ids=(eos,), pad_token_id=-1, stream=lambda s, t: calls.append(
        (s, t.tolist())), stop=stop, return_logps=True, chunk_size=chunk, **kw)
    return got, calls, stops

  (want, want_lp), want_calls, want_stops = run(1)
  assert np.all(want[1, 5:] == -1) and np.all(want[1, :5] >= 0)  # the stop ended row 1 after 5 tokens
  assert (want[0] == eos).any() and np.all(want[0, np.argmax(want[0] == eos) + 1:] == -1)
  for chunk in (3, 8, 32):
    (got, lp), calls, stops = run(chunk)
    np.testing.assert_array_equal(got, want, err_msg=f"chunk {chunk}")
    np.testing.assert_array_equal(lp, want_lp, err_msg=f"chunk {chunk}")
    assert calls == want_calls and stops == want_stops, chunk
