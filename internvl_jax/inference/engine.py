"""JAX-native generation: prefill (vision + text) into a preallocated KV cache, then decoding in chunks: one
jitted program (`Engine.decode`) runs up to `steps` decode steps in a `lax.while_loop` with the cache donated,
eos detection, per-row token limits, the active mask, the PRNG and the repetition-penalty table all on the
device, greedy or sampled (temperature, top-k, top-p, repetition penalty). The host sees a chunk of tokens
per dispatch: `generate` replays them step by step for `stream` and `stop` (a stop ends a row at exactly
that token; what the device drew for it later in the chunk is dropped), the server (`server.py`) for its
streams and stop strings.

Shapes are bucketed so a long-running process compiles a bounded set of programs: prompt lengths round
up to powers of two from 16 to 128 and then to four steps per octave (`length_bucket`), tile counts and
batch sizes to powers of two, cache lengths to powers of two covering prompt + new tokens. A process that
sees prompts up to L tokens (L >= 128), up to T tiles, batches up to B and caches up to C compiles at most
(4 log2(L/128) + 4) x (log2(T)+1) x (log2(B)+1) prefill programs and log2(C/16)+1 x log2(B)+1 x
log2(C/64)+1 decode programs (cache length, batch, and the span of slots attention reads, a power of two
>= 64 covering the longest active row until the chunk's end), one per combination it meets and per chunk
length used (one: `generate` and the server default to 8 steps; a chunk that ends early, all rows done,
runs the same program).

Each row's prompt sits at cache slots 0..len-1 (padding after it is marked invalid and overwritten as the
row grows), so rows of different lengths decode side by side at their own positions, and a server can
put a new request into any free row (continuous batching: `Engine.join`). The first token after a prefill
is drawn by a jitted program too (`Engine.first_token`), shared by `generate` and the server.

A Flash model (ViR, `model/vir.py`) routes before the prefill (`Engine.route`): one more program per tile
bucket (ViT, both projections, the router), then the prefill takes the routed features instead of pixels.
"""
from __future__ import annotations

import dataclasses
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.model import backend
from internvl_jax.model import vir
from internvl_jax.model.internvl import InternVL, check_image_count, check_image_tokens, check_vocab
from internvl_jax.inference.sampling import Sampling, sample, settings_arrays, token_logp


def bucket(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def length_bucket(n: int) -> int:
  """Prompt-length bucket: powers of two up to 128 (at least 16), then four steps per octave (128, 160,
  192, 224, 256, 320, ...), so padding wastes at most 25% of a prefill instead of up to 50%."""
  n = max(int(n), 16)
  if n <= 128:
    return bucket(n)
  step = bucket(n) // 8  # n lies in (4 * step, 8 * step]
  return -(-n // step) * step


# Slots a cache holds beyond the length asked for. Attention reads a power-of-two span of slots; a span that
# was the whole cache (no slice between the in-place write and the read) made XLA:CPU copy every layer's
# cache on every step: 4 layers of a 4096-slot batch-1 cache took 151 ms per step against 89 ms read as 4096
# of 4112 slots, and the 1B model's batch-1 step at 512 slots 263 ms against 120 ms with the slack.
CACHE_SLACK = 16


def init_cache(cfg, batch: int, length: int):
  """An empty KV cache for `length` tokens: per-layer keys [batch, kv_heads, head_dim, S] and values [batch,
  kv_heads, S, head_dim] (see model/attention.py) with elements as `backend.kv_storage` keeps them, slot
  validity, and each row's next write slot; S = length + CACHE_SLACK. A sliding-window layer (GPT-OSS)
  keeps a ring of `sliding_window` slots instead of S (`attention.ring_attention`)."""
  t, length = cfg.text, length + CACHE_SLACK
  dt = backend.kv_storage(cfg.compute_dtype)
  slots = [t.window(i) or length for i in range(t.num_layers)]
  return {"k": tuple(jnp.zeros((batch, t.num_kv_heads, t.head_dim, s), dt) for s in slots),
          "v": tuple(jnp.zeros((batch, t.num_kv_heads, s, t.head_dim), dt) for s in slots),
          "valid": jnp.zeros((batch, length), bool), "index": jnp.zeros((batch,), jnp.int32)}


def cache_bytes(cfg, batch: int, length: int) -> int:
  """Bytes of `init_cache(cfg, batch, length)`'s keys and values (without CACHE_SLACK)."""
  t = cfg.text
  per_slot = 2 * batch * t.num_kv_heads * t.head_dim * jnp.dtype(backend.kv_storage(cfg.compute_dtype)).itemsize
  return per_slot * sum(t.window(i) or length for i in range(t.num_layers))


@dataclasses.dataclass
class Routed:
  """Rows after Flash routing (`Engine.route`): the shortened token ids, what fills their <IMG_CONTEXT> slots
  (device arrays for `Engine.prefill(features=...)`), and per row {'tiles', 'compressed_tiles',
  'visual_tokens_before', 'visual_tokens_after'}."""

  rows: list[np.ndarray]
  features: tuple | None  # (full [N, T, d], compressed [N, C, d], index [n_bucket], n) or None without images
  stats: list[dict]


def visual_stats(tiles: int, compressed: int, t: int, c: int) -> dict:
  """Visual tokens of a request of `tiles` tiles of t tokens, `compressed` of them down to c."""
  saved = compressed * (t - c)
  return {"tiles": tiles, "compressed_tiles": compressed, "visual_tokens_before": tiles * t,
          "visual_tokens_after": tiles * t - saved}


def unrouted_stats(row, cfg) -> dict:
  """`visual_stats` of a row that was not routed: every image token stays."""
  n = int(np.sum(np.asarray(row) == cfg.image_token_id))
  return {"tiles": n // cfg.tokens_per_tile, "compressed_tiles": 0, "visual_tokens_before": n,
          "visual_tokens_after": n}


class Engine:
  """The jitted prefill / first-token / decode / join programs of one model structure. Parameters are passed
  per call (`state = nnx.state(model)`), so a model that is being trained generates with its current weights."""

  def __init__(self, model: InternVL):
    self.cfg = model.cfg
    self.graphdef = nnx.graphdef(model)
    self.min_batch = backend.min_batch(self.cfg.compute_dtype)
    self._prefill = jax.jit(self._prefill_impl, donate_argnums=(4,))
    self._step = jax.jit(self._step_impl, donate_argnums=(2, 3), static_argnames=("span",))
    self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnames=("span", "steps"))
    self._first = jax.jit(self._pick, donate_argnums=(1,))
    self._join = jax.jit(self._join_impl, donate_argnums=(0, 1, 2))
    self._vision = jax.jit(self._vision_impl)

  # ------------------------------------------------------------------------------- jitted programs

  def _prefill_impl(self, state, ids, mask, pixels, cache, features=None, image_features=None):
    model = nnx.merge(self.graphdef, state)
    if image_features is not None:  # DvD: the rows of the <IMG_CONTEXT> slots, computed by a vision server
      embeds = model.embed_inputs(ids, image_features=image_features, checked=True)
    elif features is not None:  # Flash: each kept slot's feature from the full or the compressed table
      full, compressed, index = features
      table = jnp.concatenate([full.reshape(-1, full.shape[-1]), compressed.reshape(-1, compressed.shape[-1])])
      embeds = model.embed_inputs(ids, image_features=table[index], checked=True)
    else:
      embeds = model.embed_inputs(ids, pixels, checked=True)  # `prefill` checked the count; tiles are padded
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    out = model.language_model(embeds, positions, mask.astype(jnp.int32), cache=cache, logits_at=last,
                               span=min(ids.shape[1], cache["valid"].shape[1]), fresh=True)
    return out.logits[:, 0].astype(jnp.float32), out.cache

  def _step_impl(self, state, tokens, cache, seen, active, key, settings, span):
    model = nnx.merge(self.graphdef, state)
    lm = model.language_model
    embeds = lm.embed(tokens[:, None])
    positions = cache["index"][:, None]
    out = lm(embeds, positions, active[:, None].astype(jnp.int32), cache=cache, logits_at=jnp.zeros_like(tokens),
             span=span)
    nxt, seen, logp = self._pick(out.logits[:, 0].astype(jnp.float32), seen, key, settings)
    return nxt, out.cache, seen, logp

  def _decode_impl(self, state, carry, settings, limit, eos, span, steps):
    """Up to `steps` decode steps in one program (a while loop that ends early once no row is active). Each
    step draws every active row's next token, and a row stops at an `eos` id or when its count reaches its
    `limit`. -> (carry after the last step, tokens [b, steps] with -1 where a row drew none, log-probs)."""
    b = carry["tokens"].shape[0]

    def body(loop):
      i, c, out, logps = loop
      if "words" in c:  # per-row seeds: token n of a row is drawn with fold_in(its seed's key, n)
        keys, c = row_keys(c["words"], c["count"]), dict(c)
      else:  # one key for the batch, split once per step as the host loop did
        key, keys = jax.random.split(c["key"])
        c = dict(c, key=key)
      active = c["active"]
      nxt, cache, seen, logp = self._step_impl(state, c["tokens"], c["cache"], c["seen"], active, keys, settings,
                                               span)
      count = c["count"] + active
      still = active & ~jnp.isin(nxt, eos) & (count < limit)
      c.update(tokens=nxt, cache=cache, seen=seen, active=still, count=count)
      out = out.at[:, i].set(jnp.where(active, nxt, -1))
      logps = logps.at[:, i].set(jnp.where(active, logp, 0.0))
      return i + 1, c, out, logps

    init = (jnp.int32(0), carry, jnp.full((b, steps), -1, jnp.int32), jnp.zeros((b, steps), jnp.float32))
    _, carry, out, logps = jax.lax.while_loop(lambda l: (l[0] < steps) & jnp.any(l[1]["active"]), body, init)
    return carry, out, logps

  def _vision_impl(self, state, pixels):
    return nnx.merge(self.graphdef, state).flash_features(pixels)

  def _pick(self, logits, seen, key, settings):
    """The next token of every row from its logits, marked as seen, with its log-prob."""
    nxt = sample(logits, key, seen, *settings)
    seen = seen.at[jnp.arange(nxt.shape[0]), nxt].set(True)
    return nxt, seen, token_logp(logits, nxt)

  def _join_impl(self, cache, tokens, seen, one, row, first, first_seen):
    """Row 0 of a prefilled request (its cache, first token and seen row) into row `row` of a running batch."""
    put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small[:1].astype(big.dtype), row, axis=0)
    return jax.tree.map(put, cache, one), tokens.at[row].set(first[0]), seen.at[row].set(first_seen[0])

  # ------------------------------------------------------------------------------- host side

  def route(self, state, rows: list[np.ndarray], pixel_values, *, flash=None) -> Routed:
    """Flash (ViR): one ViT pass over all rows' tiles gives both projections and each tile's p0; every row is
    routed on its own tiles (`vir.route`: the quantile is over that request's tiles, so a row's routing does
    not depend on what it is batched with) and shortened (`vir.compress_row`). Rows' <IMG_CONTEXT> runs must
    be whole tiles; the tiles' count must match theirs. flash: the FlashConfig to route by (default the
    engine's model's; `generate` passes its model's current one)."""
    flash = flash or self.cfg.flash
    if flash is None:
      raise ValueError("this model has no ViR router (InternVLConfig.flash is None): flash=True needs a Flash model")
    n_tiles = 0 if pixel_values is None else len(pixel_values)
    tokens = vir.tile_tokens(self.cfg, pixel_values.shape) if n_tiles else None
    counts = [vir.tiles_in_row(r, self.cfg, i, tokens=tokens) for i, r in enumerate(rows)]
    if sum(counts) != n_tiles:
      t = (tokens or (self.cfg.tokens_per_tile,))[0]
      raise ValueError(f"<IMG_CONTEXT> count mismatch: the rows' image tokens make {sum(counts)} tiles of {t} "
                       f"tokens but pixel_values hold {n_tiles} tiles")
    if not n_tiles:
      return Routed(list(rows), None, [unrouted_stats(r, self.cfg) for r in rows])
    table = bucket(n_tiles)
    pixels = np.zeros((table,) + tuple(pixel_values.shape[1:]), np.float32)
    pixels[:n_tiles] = pixel_values
    full, compressed, p0 = self._vision(state, jnp.asarray(pixels))
    p0 = np.asarray(p0)
    out, index, stats, first = [], [], [], 0
    for r, n in zip(rows, counts):
      squeeze = vir.route(p0[first:first + n], flash)
      ids, idx = vir.compress_row(r, squeeze, self.cfg, first_tile=first, table_tiles=table, tokens=tokens)
      out.append(ids)
      index.append(idx)
      stats.append(visual_stats(n, int(squeeze.sum()), *tokens))
      first += n
    index = np.concatenate(index)
    padded = np.zeros(bucket(index.size), np.int32)
    padded[:index.size] = index
    return Routed(out, (full, compressed, jnp.asarray(padded), index.size), stats)

  def prefill(self, state, rows: list[np.ndarray], pixel_values, cache_len: int, *, features=None,
              image_features=None):
    """rows: token id arrays (unpadded); pixel_values: all tiles in row order, or None; features: instead of
    pixel_values, `Routed.features` of these rows (from `route`); image_features: instead of both, the rows
    [n, d] of the <IMG_CONTEXT> slots in order (DvD: from a vision server; padded here to a power of two).
    -> (last-position logits [B_bucket, V], cache, B_bucket)."""
    b = max(bucket(len(rows)), self.min_batch)
    longest = max(len(r) for r in rows)
    if longest > cache_len:
      raise ValueError(f"a prompt of {longest} tokens does not fit a cache of {cache_len} slots")
    t = min(length_bucket(longest), cache_len)
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
    cache = init_cache(self.cfg, b, cache_len)
    if image_features is not None:
      if pixel_values is not None or features is not None:
        raise ValueError("pass one of pixel_values, features, image_features")
      feats = np.asarray(image_features)
      if feats.ndim != 2 or feats.shape[1] != self.cfg.text.hidden_size:
        raise ValueError(f"image_features must be [tokens, {self.cfg.text.hidden_size}], got {list(feats.shape)}")
      check_image_tokens(ids, len(feats), self.cfg.image_token_id)
      padded = np.zeros((bucket(len(feats)), feats.shape[1]), feats.dtype)
      padded[:len(feats)] = feats
      logits, cache = self._prefill(state, jnp.asarray(ids), jnp.asarray(mask), None, cache, None, jnp.asarray(padded))
      return logits, cache, b
    if features is not None:
      if pixel_values is not None:
        raise ValueError("pass pixel_values or features, not both")
      full, compressed, index, n = features
      check_image_tokens(ids, n, self.cfg.image_token_id)
      logits, cache = self._prefill(state, jnp.asarray(ids), jnp.asarray(mask), None, cache, (full, compressed, index))
      return logits, cache, b
    check_image_count(self.cfg, ids, pixel_values)
    n_tiles = 0 if pixel_values is None else len(pixel_values)
    pixels = None
    if n_tiles:
      pixels = np.zeros((bucket(n_tiles),) + tuple(pixel_values.shape[1:]), np.float32)
      pixels[:n_tiles] = pixel_values
    logits, cache = self._prefill(state, jnp.asarray(ids), jnp.asarray(mask), pixels, cache)
    return logits, cache, b

  def step(self, state, tokens, cache, seen, active, key, settings, longest: int):
    """One token for every row -> (tokens [b], cache, seen, their log-probs [b] (`token_logp`)): the body of
    `decode`'s loop as a program of its own (benchmarks time it bare). `longest` = the largest cache index
    of an active row before this step, rounded up to a bucket so attention reads only the slots in use."""
    return self._step(state, tokens, cache, seen, active, key, settings, span=self.span(cache, longest + 1))

  def span(self, cache, slots: int) -> int:
    """The attention span bucket covering `slots` cache slots: a power of two >= 64, at most the length the
    cache was made for (no row writes beyond it: prompt + new tokens fit), never the whole cache."""
    return min(cache["valid"].shape[1] - CACHE_SLACK, bucket(slots + 1, 64))

  def decode(self, state, carry: dict, settings, limit, eos, longest: int, steps: int = 8):
    """Up to `steps` tokens for every active row in one dispatch (the loop, eos, limits, PRNG and the
    repetition-penalty table all on the device) -> (carry, tokens [b, steps] int32, log-probs [b, steps]),
    -1 / 0 where a row drew no token. carry (donated; `decode_carry` builds it): tokens [b] (each row's
    last token), cache, seen [b, V], active [b], count [b] (tokens drawn so far), and either key (one PRNG
    key, split once per step) or words [b, 2] uint32 (per-row seeds: token n drawn with
    fold_in(key(seed), n), as the server needs). limit [b]: a row stops when its count reaches it; eos [E]
    int32. longest: the largest cache index of an active row before the first step."""
    span = self.span(carry["cache"], longest + steps)
    return self._decode(state, carry, settings, jnp.asarray(limit, jnp.int32), jnp.asarray(eos, jnp.int32),
                        span=span, steps=steps)

  def first_token(self, logits, rows: list[np.ndarray], key, settings):
    """The token after a prefill of `rows` (the prompts' ids, as given to `prefill`), drawn as the decode
    step draws -> (tokens [b], seen [b, V]: each row's prompt and new token, for the repetition penalty,
    log-probs [b]). Jitted like the other programs: eager sampling would compile its lax.conds anew on
    every call."""
    seen = np.zeros((logits.shape[0], self.cfg.text.vocab_size), bool)
    for i, r in enumerate(rows):
      seen[i, r] = True
    return self._first(logits, jnp.asarray(seen), key, settings)

  def join(self, cache, tokens, seen, one, row: int, first, first_seen):
    """Continuous batching: put a prefilled request (`one` from `prefill`, its first token and seen table
    from `first_token`) into row `row` of the running batch's (cache, tokens, seen), all donated."""
    return self._join(cache, tokens, seen, one, jnp.int32(row), first, first_seen)


_ENGINES: "weakref.WeakKeyDictionary[InternVL, Engine]" = weakref.WeakKeyDictionary()


def engine_for(model: InternVL) -> Engine:
  """One Engine per model object, so repeated generate() calls reuse its compiled programs."""
  if model not in _ENGINES:
    _ENGINES[model] = Engine(model)
  return _ENGINES[model]


def row_keys(words, counts):
  """PRNG keys of the rows' next tokens: seed words uint32 [b, 2], tokens drawn so far [b] -> keys [b]."""
  return jax.vmap(lambda w, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(w[0]), w[1]), c))(words, counts)


def decode_carry(tokens, cache, seen, active, count, *, key=None, words=None) -> dict:
  """The state `Engine.decode` carries from chunk to chunk, on the device: key for one batch key, words for
  per-row seeds."""
  carry = {"tokens": tokens, "cache": cache, "seen": seen, "active": jnp.asarray(active, bool),
           "count": jnp.asarray(count, jnp.int32)}
  if (key is None) == (words is None):
    raise ValueError("give key (one for the batch) or words (per-row seeds), not both or neither")
  return {**carry, "key": key} if key is not None else {**carry, "words": jnp.asarray(words, jnp.uint32)}


def use_flash(cfg, flash: bool | None) -> bool:
  """Whether generation routes tiles: `flash` if given (True needs a Flash model), else the checkpoint's
  flash_mode (`cfg.flash.mode`)."""
  if flash and cfg.flash is None:
    raise ValueError("flash=True needs a Flash model (InternVLConfig.flash is None: no ViR router)")
  return bool(cfg.flash.mode if flash is None and cfg.flash is not None else flash)


def generate(model: InternVL, input_ids, pixel_values=None, *, attention_mask=None, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             seed: int = 0, eos_token_ids=(151645,), pad_token_id: int = 151643, stream=None,
             stop=None, return_logps: bool = False, engine: Engine | None = None, flash: bool | None = None,
             return_stats: bool = False, chunk_size: int = 8):
  """New token ids [batch, new_tokens]; after a row stops (an eos id, or `stop`), the rest is pad_token_id.
  return_logps=True returns (ids, logps): logps [batch, new_tokens] float32, each new token's log-prob under
  the model's untempered distribution (`token_logp`), 0 after the row stops — the rollout policy's
  log-probs that RL needs. `engine`: an Engine of the same model structure whose compiled programs to reuse
  (the RL loop merges a new model object from its current parameters for every rollout batch).

  input_ids [batch, seq] may be left- or right-padded (attention_mask marks real tokens); pixel_values
  [tiles, H, W, 3] are the tiles of all rows in order. stream(step, tokens [batch]) is called per step;
  stop(row, new_ids_so_far) -> bool ends a row early (stop strings, in `chat`).

  flash (InternVL3.5-Flash): route every row's tiles through the ViR router (`Engine.route`), each row on its
  own tiles; default: the model's `cfg.flash.mode` (False for a model without a router). return_stats=True
  appends a list of per-row dicts to the result: tiles, compressed_tiles, visual_tokens_before/after routing.

  Decoding runs `chunk_size` steps per dispatch (`Engine.decode`: eos, max_new_tokens and sampling on the
  device); stream and stop see every step, in order, once its chunk is back, so a stop ends a row at exactly
  the token it would end at step by step (the device's extra steps for that row are discarded).
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if ids.ndim != 2 or mask.shape != ids.shape:
    raise ValueError(f"input_ids must be [batch, seq] with a matching attention_mask; got {ids.shape}, {mask.shape}")
  check_vocab(ids, model.cfg.text.vocab_size)
  rows = [r[m.astype(bool)] for r, m in zip(ids, mask)]
  engine, state = engine or engine_for(model), nnx.state(model)
  pixels = None if pixel_values is None else np.asarray(pixel_values)
  routed = engine.route(state, rows, pixels, flash=model.cfg.flash) if use_flash(model.cfg, flash) else None
  if routed is not None:
    rows = routed.rows
  cache_len = bucket(length_bucket(max(len(r) for r in rows)) + max_new_tokens, 16)
  logits, cache, b = engine.prefill(state, rows, None if routed else pixels, cache_len,
                                    features=routed.features if routed else None)
  settings = settings_arrays([Sampling(temperature, top_k, top_p, repetition_penalty)] * len(rows), b)
  key, sub = jax.random.split(jax.random.key(seed))
  tokens, seen, logp = engine.first_token(logits, rows, sub, settings)
  n, active = len(rows), np.arange(b) < len(rows)
  eos = np.asarray(list(eos_token_ids or ()), np.int32)
  out = np.full((n, max_new_tokens), pad_token_id, np.int64)
  out_logps = np.zeros((n, max_new_tokens), np.float32)

  def record(step, column, lps):
    """Token `step` of every row (-1: none drawn), as the device drew it; stops apply here, in order."""
    nonlocal active
    drew = active & (column >= 0)
    out[drew[:n], step] = column[:n][drew[:n]]
    if return_logps:
      out_logps[drew[:n], step] = lps[:n][drew[:n]]
    if stream is not None:
      stream(step, np.where(drew[:n], column[:n], pad_token_id))
    active = drew & ~np.isin(column, eos)
    if stop is not None:
      for i in np.flatnonzero(active[:n]):
        active[i] = not stop(i, out[i, :step + 1])

  record(0, *jax.device_get((tokens, logp)))
  carry = decode_carry(tokens, cache, seen, active, np.ones(b, np.int32), key=key)
  limit, step, longest = np.full(b, max_new_tokens, np.int32), 1, max(len(r) for r in rows)
  while step < max_new_tokens and active.any():
    carry, chunk, lps = engine.decode(state, carry, settings, limit, eos, longest + step - 1, steps=chunk_size)
    chunk, lps = jax.device_get((chunk, lps))
    for j in range(chunk.shape[1]):
      if step >= max_new_tokens or not active.any():
        break
      record(step, chunk[:, j], lps[:, j])
      step += 1
    if stop is not None:  # rows a stop ended mid-chunk: the device ran them on, and must not go on
      carry["active"] = jnp.logical_and(carry["active"], jnp.asarray(active))
  result = (out, out_logps) if return_logps else (out,)
  if return_stats:
    result += (routed.stats if routed else [unrouted_stats(r, model.cfg) for r in rows],)
  return result[0] if len(result) == 1 else result
