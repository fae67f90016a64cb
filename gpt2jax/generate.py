"""Text generation with a KV cache: sampling filters, batched decoding, streaming, a benchmark.

Design, for batch-1 speed on CPU (decoding reads every weight once per token):
- the layers run unrolled inside jit (a scan over stacked layers would copy every weight
  matrix per token), so a scan-layers model is unstacked once, outside jit;
- prompts are left padded to a shape bucket and the cache length is bucketed too, so many
  prompts reuse one compilation; positions come from the padding mask;
- the prompt is prefilled in one call, then jitted chunks of `chunk` decode steps run a
  `fori_loop`; the cache is donated so it is updated in place, and Python sees the tokens
  after each chunk (to stream text, check stop strings and stop early).

The sampling filters (repetition penalty, no-repeat n-grams, temperature, top-k, top-p)
are pure functions on logits with the Hugging Face definitions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import DTYPES
from .errors import UserError
from .model import GPT2, JNP_DTYPES, positions_from_mask
from .tokenizer import encode, eos_id

FINISH_REASONS = ("eos", "stop", "length")


# ---------------------------------------------------------------- pure filters


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor: for tokens already seen, divide a positive
    logit by `penalty` and multiply a negative one. `seen` is a (B, V) boolean mask."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def ban_repeated_ngrams(logits: jax.Array, history: jax.Array, length: jax.Array,
                        n: int) -> jax.Array:
    """HF's NoRepeatNGramLogitsProcessor: a token that would repeat an n-gram already in the
    row gets -inf. `history` (B, T) holds each row's tokens in slots [0, length), -1 where
    there is none (left padding): an n-gram that touches padding never matches."""
    b, t = history.shape
    if n < 1 or t < n:
        return logits
    # before n - 1 tokens exist the slice reaches unfilled (-1) slots, which match nothing
    start = jnp.maximum(length - (n - 1), 0)
    prefix = jax.lax.dynamic_slice_in_dim(history, start, n - 1, axis=1)  # (B, n-1)
    starts = jnp.arange(t - n + 1)
    # windows[k][:, j] = history[:, j + k]: the first n-1 tokens of every n-gram
    match = (starts + n - 1 < length)[None, :] & jnp.all(prefix >= 0, axis=1, keepdims=True)
    for k in range(n - 1):
        match &= history[:, k:t - n + 1 + k] == prefix[:, k:k + 1]
    match &= history[:, n - 1:] >= 0
    follow = jnp.clip(history[:, n - 1:], 0, logits.shape[-1] - 1)  # the n-th token
    banned = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], follow].max(match)
    return jnp.where(banned, -jnp.inf, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties with the k-th are kept), others -> -inf.

    The k-th largest value is found by bisection over the float bit patterns (32 counts):
    exact, and on CPU much faster than lax.top_k or a sort over the vocabulary.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    bits = _ordered_bits(logits)
    lo = jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32)
    hi = jnp.full_like(lo, 0xFFFFFFFF)

    def body(_, bounds):  # largest t with count(bits >= t) >= k; the count falls as t grows
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = jnp.sum(bits >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    threshold, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where(bits < threshold, -jnp.inf, logits)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (so a threshold can be found by bisection)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = u >> 31
    return jnp.where(sign == 1, ~u, u | jnp.uint32(0x80000000))


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keep the most probable tokens until their total probability reaches p.

    A token is kept when the probability mass of the tokens ranked strictly above it is
    below p (so the most probable token is always kept) -- HF's TopPLogitsWarper. The
    threshold is found by bisection over the float bit patterns (32 masked sums), which
    is exact and far faster on CPU than sorting the vocabulary.
    """
    if p >= 1.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    bits = _ordered_bits(logits)
    lo = jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32)
    hi = jnp.full_like(lo, 0xFFFFFFFF)

    def body(_, bounds):  # smallest t with mass(bits > t) < p; mass falls as t grows
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        small = jnp.sum(jnp.where(bits > mid, probs, 0.0), axis=-1, keepdims=True) < p
        return jnp.where(small, lo, mid + 1), jnp.where(small, mid, hi)

    _, threshold = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where(bits < threshold, -jnp.inf, logits)


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw from softmax(logits) (1-D) by inverting the CDF with one uniform number:
    a few times faster on CPU than Gumbel noise over the whole vocabulary."""
    cdf = jnp.cumsum(jax.nn.softmax(logits))
    u = (1.0 - jax.random.uniform(key)) * cdf[-1]  # in (0, total]: zero-mass tokens never win
    return jnp.minimum(jnp.sum(cdf < u), logits.shape[-1] - 1)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. Hashable: one compilation per distinct setting."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0  # n > 0: never repeat an n-gram (HF's no_repeat_ngram_size)

    def validate(self) -> Sampling:
        """Raise UserError for settings that make no sense; returns self."""
        ignored = [name for name, on in (("temperature", self.temperature != 1.0),
                                          ("top-k", self.top_k != 0), ("top-p", self.top_p != 1.0))
                   if on]
        if self.greedy and ignored:
            raise UserError(f"greedy decoding always takes the most likely token, so "
                            f"--{ignored[0]} would have no effect: drop it, or sample instead")
        if not self.greedy and not self.temperature > 0:
            raise UserError(
                f"temperature must be > 0 when sampling, got {self.temperature}; "
                "use --greedy for deterministic decoding"
            )
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(
                f"repetition penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"
            )
        if self.no_repeat_ngram < 0:
            raise UserError(f"no-repeat-ngram must be >= 0 (0 turns it off), got "
                            f"{self.no_repeat_ngram}")
        return self


def next_token(logits: jax.Array, seen: jax.Array | None, keys: jax.Array, s: Sampling,
               history: jax.Array | None = None, length: jax.Array | None = None):
    """Pick one token per row from float32 logits (B, V); keys are per-row PRNG keys.

    `seen` (B, V) feeds the repetition penalty; `history` (B, T) with its filled `length`
    the no-repeat n-gram rule (HF's processor order: penalty, then n-grams, then warpers).
    """
    if s.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.no_repeat_ngram and history is not None:
        logits = ban_repeated_ngrams(logits, history, length, s.no_repeat_ngram)
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    logits = top_k_filter(logits, s.top_k)
    logits = top_p_filter(logits, s.top_p)
    return jax.vmap(sample_categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------- shape buckets


def bucket(n: int, cap: int) -> int:
    """Round n up to a power of two (at least 16) up to 64, then to a multiple of 64; cap it."""
    b = 16
    while b < n and b < 64:
        b *= 2
    if n > b:
        b = -(-n // 64) * 64
    return min(b, cap)


# ---------------------------------------------------------------- jitted pieces


@functools.lru_cache(maxsize=8)
def _compiled(graphdef) -> tuple[Callable, Callable]:
    """(prefill, decode) jitted for one model structure; shapes bucket the recompiles."""

    def prefill(state, ids, prompt_mask, row_keys, total, sampling, with_logits):
        model = nnx.merge(graphdef, state)
        b, p = ids.shape
        cache = model.init_cache(b, total, model.cfg.compute_dtype)
        # Slots past the prompt are hidden by causality; padding slots by the mask.
        cache_mask = jnp.concatenate(
            [prompt_mask, jnp.ones((b, total - p), prompt_mask.dtype)], axis=1
        )
        h, cache = model.hidden_states(
            ids, cache_mask, positions_from_mask(prompt_mask), cache=cache, cache_index=0
        )
        logits = model.lm_logits(h[:, -1:])[:, 0]
        seen = None
        if sampling.repetition_penalty != 1.0:
            counts = jnp.zeros(logits.shape, jnp.int32).at[jnp.arange(b)[:, None], ids].add(
                prompt_mask.astype(jnp.int32)
            )
            seen = counts > 0  # padding is not "seen" (HF would count the pad id)
        history = None
        if sampling.no_repeat_ngram:  # the prompt, then each new token; -1: no token
            history = jnp.full((b, total), -1, jnp.int32).at[:, :p].set(
                jnp.where(prompt_mask > 0, ids, -1))
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, 0)
        tok = next_token(logits, seen, keys, sampling, history, p)
        if seen is not None:
            seen = seen.at[jnp.arange(b), tok].set(True)
        if history is not None:
            history = history.at[:, p].set(tok)
        return tok, cache, cache_mask, (seen, history), (logits if with_logits else None)

    def decode(state, cache, tok, cache_mask, pos0, slot0, step0, n_steps, done, memory,
               row_keys, eos, chunk, sampling, with_logits):
        model = nnx.merge(graphdef, state)
        b = tok.shape[0]
        out = jnp.zeros((b, chunk), jnp.int32)
        scores = jnp.zeros((b, chunk, model.cfg.vocab_size), jnp.float32) if with_logits else None

        seen, history = memory  # what the repetition filters remember, or None

        def body(i, carry):
            cache, tok, done, seen, history, out, scores = carry
            h, cache = model.hidden_states(
                tok[:, None], cache_mask, (pos0 + i)[:, None], cache=cache, cache_index=slot0 + i
            )
            logits = model.lm_logits(h)[:, 0]
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step0 + i)
            # history holds the fed token at slot0 + i, so slot0 + i + 1 slots are filled
            nxt = next_token(logits, seen, keys, sampling, history, slot0 + i + 1)
            nxt = jnp.where(done, eos, nxt)  # finished rows keep emitting EOS
            done = done | (nxt == eos)
            if seen is not None:
                seen = seen.at[jnp.arange(b), nxt].set(True)
            if history is not None:
                history = history.at[:, slot0 + i + 1].set(nxt)
            out = out.at[:, i].set(nxt)
            if scores is not None:
                scores = scores.at[:, i].set(logits)
            return cache, nxt, done, seen, history, out, scores

        carry = (cache, tok, done, seen, history, out, scores)
        cache, tok, done, seen, history, out, scores = jax.lax.fori_loop(0, n_steps, body, carry)
        return out, cache, tok, done, (seen, history), scores

    static = ("total", "sampling", "with_logits")
    prefill_jit = jax.jit(prefill, static_argnames=static)
    decode_jit = jax.jit(
        decode, static_argnames=("chunk", "sampling", "with_logits"), donate_argnames=("cache",)
    )
    return prefill_jit, decode_jit


# ---------------------------------------------------------------- driver


@dataclass
class Sample:
    """One generated continuation. token_ids are the new tokens only (EOS included when
    the model produced it); completion is their text without EOS and stop string."""

    prompt_index: int
    sample_index: int
    prompt: str
    completion: str
    token_ids: list[int]
    finish_reason: str
    logits: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """The JSON record printed by `gpt2jax generate --json` (no logits)."""
        return {k: getattr(self, k) for k in ("prompt_index", "sample_index", "prompt",
                                              "completion", "token_ids", "finish_reason")}


def _stop_hit(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters may be shown while streaming: hold back an incomplete UTF-8
    tail (decoded as U+FFFD) and any tail that could still grow into a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    keep = n
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                keep = min(keep, n - k)
                break
    return keep


class _Row:
    """Host-side state of one sequence being decoded."""

    def __init__(self, prompt_index, sample_index, prompt, ids):
        self.prompt_index, self.sample_index, self.prompt, self.ids = (
            prompt_index, sample_index, prompt, ids
        )
        self.new: list[int] = []
        self.reason: str | None = None
        self.completion = ""
        self.shown = 0
        self.logits: list[np.ndarray] = []

    def absorb(self, tokens: list[int], logits, eos: int, max_new: int, stop: Sequence[str],
               tokenizer, on_text) -> None:
        """Append a chunk of new tokens (and their logits); detect EOS, stop strings and
        length; stream the text that is final."""
        for j, t in enumerate(tokens):
            self.new.append(t)
            if logits is not None:
                self.logits.append(logits[j] if logits.ndim == 2 else logits)
            if t == eos:
                self.reason = "eos"
                break
        if self.reason is None and not stop and on_text is None and len(self.new) < max_new:
            return  # nothing needs the text yet: decode once, when the row ends
        text = tokenizer.decode(self.new[:-1] if self.reason == "eos" else self.new)
        cut = _stop_hit(text, stop)
        if cut >= 0:
            self.reason = "stop"
            text = text[:cut]
            # the shortest prefix of the new tokens whose text holds a stop string
            n = next(n for n in range(1, len(self.new) + 1)
                     if _stop_hit(tokenizer.decode(self.new[:n]), stop) >= 0)
            self.new, self.logits = self.new[:n], self.logits[:n]
        elif self.reason is None and len(self.new) >= max_new:
            self.reason = "length"
        self.completion = text
        if on_text is not None:
            show = len(text) if self.reason else _held_back(text, stop)
            if show > self.shown:
                on_text(self.prompt_index, self.sample_index, text[self.shown:show])
                self.shown = show


def _left_padded(rows: list[_Row], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows' prompts right-aligned in (rows, length) ids and their attention mask."""
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r.ids):] = r.ids
        mask[i, length - len(r.ids):] = 1
    return ids, mask


@dataclass
class Timing:
    """Where a generate call's time went: the first token (prefill, compiles included) of
    its first batch of rows, and the decoding of every token after each row's first."""

    first_token_s: float | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0

    def add(self, first_token_s: float, decode_tokens: int, decode_s: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = first_token_s
        self.decode_tokens += decode_tokens
        self.decode_s += decode_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_tokens else None


class Generator:
    """A model prepared for decoding (unrolled layers, optional cast weights).

    Reuse one Generator for many calls: preparation may copy weights (scan-layers models,
    `weights_dtype`), and compilations are cached per model structure and shape bucket.
    """

    def __init__(self, model: GPT2, tokenizer, *, weights_dtype: str | None = None):
        self.tokenizer = tokenizer
        cfg = model.cfg
        if weights_dtype is not None and weights_dtype not in DTYPES:
            raise UserError(f"weights dtype {weights_dtype!r}: choose one of {', '.join(DTYPES)}")
        compute = weights_dtype or cfg.dtype
        if cfg.scan_layers or compute != cfg.dtype or cfg.lora_rank:
            from . import params as P
            from .lora import merge
            from .model import from_values

            values = P.flat(nnx.state(model, nnx.Param))
            plain = cfg.replace(scan_layers=False, dtype=compute)
            if cfg.lora_rank:  # fold the adapters in once, not on every decoded token
                values = merge(cfg, P.relayout({k: np.asarray(v) for k, v in values.items()},
                                               cfg.n_layer, stacked=False))
                plain = plain.replace(lora_rank=0, lora_alpha=0.0, lora_dropout=0.0,
                                      lora_targets=())
            model = from_values(plain, values)
        self.cfg = model.cfg
        graphdef, state = nnx.split(model)
        if weights_dtype and weights_dtype != "float32":
            # Stored in the compute dtype, so the per-use .astype in the model is a no-op.
            dt = JNP_DTYPES[weights_dtype]
            state = jax.tree.map(lambda a: a.astype(dt), state)
        self.graphdef, self.state = graphdef, state
        self.eos_id = eos_id(tokenizer, cfg.eos_token_id)
        self.timing = Timing()

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt; empty prompts are refused."""
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                raise UserError(f"prompt {i} is empty; give every prompt some text")
        # The same encoding as training and eval: no special tokens, ids checked vs vocab.
        out = encode(self.tokenizer, list(prompts), self.cfg.vocab_size)
        for i, ids in enumerate(out):
            if not ids:
                raise UserError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
        return out

    def generate(
        self,
        prompts: Sequence[str],
        *,
        sampling: Sampling | None = None,
        max_new_tokens: int = 64,
        stop: Sequence[str] = (),
        seed: int = 0,
        num_samples: int = 1,
        batch_size: int = 16,
        chunk: int = 8,
        on_text: Callable[[int, int, str], None] | None = None,
        on_start: Callable[[int, int, str], None] | None = None,
        return_logits: bool = False,
    ) -> list[Sample]:
        """Continue every prompt num_samples times; see `generate` for the arguments."""
        sampling = (sampling or Sampling()).validate()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("no prompts given")
        if max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        if num_samples < 1 or batch_size < 1 or chunk < 1:
            raise UserError("num-samples, batch size and chunk must be >= 1")
        stop = tuple(s for s in stop if s)
        encoded = self.encode(prompts)
        ctx = self.cfg.n_positions
        longest = max(len(ids) for ids in encoded)
        if longest + max_new_tokens > ctx:
            raise UserError(
                f"the longest prompt has {longest} tokens; with max-new-tokens "
                f"{max_new_tokens} that exceeds the model's context of {ctx} tokens: "
                f"lower --max-new-tokens to at most {ctx - longest} or shorten the prompt"
            )
        rows = [
            _Row(p, s, prompts[p], encoded[p])
            for p in range(len(prompts)) for s in range(num_samples)
        ]
        # Streaming shows one row at a time, so decode one row at a time.
        size = 1 if on_text is not None else batch_size
        self.timing = Timing()
        for start in range(0, len(rows), size):
            self._run(rows[start:start + size], sampling, max_new_tokens, stop, seed, chunk,
                      on_text, on_start, return_logits)
        return [
            Sample(r.prompt_index, r.sample_index, r.prompt, r.completion, r.new, r.reason,
                   np.stack(r.logits) if return_logits else None)
            for r in rows
        ]

    def _run(self, rows, sampling, max_new, stop, seed, chunk, on_text, on_start, with_logits):
        prefill, decode = _compiled(self.graphdef)
        ctx = self.cfg.n_positions
        longest = max(len(r.ids) for r in rows)
        p = max(longest, min(bucket(longest, ctx), ctx - max_new))
        total = bucket(p + max_new, ctx)
        ids, mask = _left_padded(rows, p, self.eos_id)
        base = jax.random.PRNGKey(seed)
        row_keys = jnp.stack([
            jax.random.fold_in(jax.random.fold_in(base, r.prompt_index), r.sample_index)
            for r in rows
        ])
        if on_start is not None:
            for r in rows:
                on_start(r.prompt_index, r.sample_index, r.prompt)
        t0 = time.perf_counter()
        tok, cache, cache_mask, memory, logits = prefill(
            self.state, ids, mask, row_keys, total, sampling, with_logits
        )
        absorb = functools.partial(self._absorb, rows, max_new=max_new, stop=stop,
                                   on_text=on_text)
        absorb(np.asarray(tok)[:, None], logits)
        t1 = time.perf_counter()
        pos0 = jnp.asarray(mask.sum(1), jnp.int32)  # position of the first new token
        done = jnp.asarray([r.reason is not None for r in rows])
        step = 1
        while step < max_new and any(r.reason is None for r in rows):
            n = min(chunk, max_new - step)
            out, cache, tok, done, memory, scores = decode(
                self.state, cache, tok, cache_mask, pos0 + (step - 1), p + step - 1, step, n,
                done, memory, row_keys, self.eos_id, chunk, sampling, with_logits,
            )
            out = np.asarray(out)[:, :n]
            absorb(out, None if scores is None else scores[:, :n])
            step += n
        self.timing.add(t1 - t0, sum(len(r.new) - 1 for r in rows), time.perf_counter() - t1)

    def _absorb(self, rows, new_tokens, logits, *, max_new, stop, on_text) -> None:
        logits = None if logits is None else np.asarray(logits)
        for i, r in enumerate(rows):
            if r.reason is None:
                r.absorb(new_tokens[i].tolist(), None if logits is None else logits[i],
                         self.eos_id, max_new, stop, self.tokenizer, on_text)


def generate(
    model: GPT2,
    tokenizer,
    prompts: Sequence[str] | str,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int = 16,
    on_text: Callable[[int, int, str], None] | None = None,
    return_logits: bool = False,
) -> list[Sample]:
    """Continue each prompt `num_samples` times with the model's KV cache.

    Sampling draws use a key per (seed, prompt index, sample index, step), so a sample does
    not depend on the batch it ran in. Stops at EOS, at any `stop` string (cut from the
    completion) or after max_new_tokens. `on_text(prompt_index, sample_index, text)` streams
    text as it is produced (rows then run one at a time). `return_logits` keeps each step's
    raw logits on the samples (to inspect the distribution, or to check the decoder
    against another implementation). For repeated calls build a `Generator` once.
    """
    sampling = Sampling(greedy, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram)
    return Generator(model, tokenizer).generate(
        prompts, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop, seed=seed,
        num_samples=num_samples, batch_size=batch_size, on_text=on_text,
        return_logits=return_logits,
    )
