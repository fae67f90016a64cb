"""Text generation with a KV cache: sampling filters (pure functions on logits, Hugging
Face's definitions), batched decoding, streaming. docs/generation.md says how it works.
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

# ---------------------------------------------------------------- pure filters


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor: for tokens already seen ((B, V) mask), divide
    a positive logit by `penalty` and multiply a negative one."""
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


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (so a threshold can be found by bisection)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _keep_top(logits: jax.Array, weights: jax.Array, target) -> jax.Array:
    """-inf below the largest logit t whose tokens with logit >= t weigh at least `target`
    (t by bisection over the float bit patterns: exact, and on CPU faster than a sort)."""
    bits = _ordered_bits(logits)
    lo = jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32)
    hi = jnp.full_like(lo, 0xFFFFFFFF)

    def body(_, bounds):  # the weight above t falls as t grows
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = jnp.sum(jnp.where(bits >= mid, weights, 0), axis=-1, keepdims=True) >= target
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    threshold, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where(bits < threshold, -jnp.inf, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties with the k-th are kept), others -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    return _keep_top(logits, jnp.int32(1), k)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter (HF's TopPLogitsWarper): keep a token while the probability of the
    tokens ranked strictly above it is below p (the most probable token is always kept)."""
    if p >= 1.0:
        return logits
    return _keep_top(logits, jax.nn.softmax(logits, axis=-1), p)


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
            raise UserError(f"temperature must be > 0 when sampling, got {self.temperature}; "
                            "use --greedy for deterministic decoding")
        # (name, value, allowed, the range in words, the value that turns it off)
        for name, value, ok, allowed, off in (
            ("top-k", self.top_k, self.top_k >= 0, ">= 0", 0),
            ("top-p", self.top_p, 0.0 < self.top_p <= 1.0, "in (0, 1]", 1),
            ("repetition penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0", 1),
            ("no-repeat-ngram", self.no_repeat_ngram, self.no_repeat_ngram >= 0, ">= 0", 0),
        ):
            if not ok:
                raise UserError(f"{name} must be {allowed} ({off} turns it off), got {value}")
        return self


def next_token(logits: jax.Array, keys: jax.Array, s: Sampling,
               history: jax.Array | None = None, length: jax.Array | None = None) -> jax.Array:
    """One token per row from float32 logits (B, V); keys are per-row PRNG keys.

    `history` (B, T) holds each row's tokens in slots [0, length), -1 for none; it feeds the
    repetition penalty and the n-gram rule (HF's order: penalty, n-grams, then warpers).
    """
    if s.repetition_penalty != 1.0 and history is not None:
        rows = jnp.arange(logits.shape[0])[:, None]
        seen = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(history, 0)].max(history >= 0)
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.no_repeat_ngram and history is not None:
        logits = ban_repeated_ngrams(logits, history, length, s.no_repeat_ngram)
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(top_k_filter(logits / s.temperature, s.top_k), s.top_p)
    return jax.vmap(sample_categorical)(keys, logits).astype(jnp.int32)


def bucket(n: int, cap: int) -> int:
    """Round n up to a power of two (at least 16) up to 64, then to a multiple of 64; cap it."""
    b = 16
    while b < n and b < 64:
        b *= 2
    if n > b:
        b = -(-n // 64) * 64
    return min(b, cap)


# ---------------------------------------------------------------- jitted pieces


def _step_keys(row_keys: jax.Array, step) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)


@functools.lru_cache(maxsize=8)
def _compiled(graphdef) -> tuple[Callable, Callable]:
    """(prefill, decode) jitted for one model structure; shapes bucket the recompiles."""

    def prefill(state, ids, prompt_mask, row_keys, total, sampling):
        model = nnx.merge(graphdef, state)
        b, p = ids.shape
        cache = model.init_cache(b, total, model.cfg.compute_dtype)
        # Slots past the prompt are hidden by causality; padding slots by the mask.
        cache_mask = jnp.concatenate(
            [prompt_mask, jnp.ones((b, total - p), prompt_mask.dtype)], axis=1)
        h, cache = model.hidden_states(
            ids, cache_mask, positions_from_mask(prompt_mask), cache=cache, cache_index=0)
        logits = model.lm_logits(h[:, -1:])[:, 0]
        history = None  # the prompt (-1 on padding), then each new token
        if sampling.repetition_penalty != 1.0 or sampling.no_repeat_ngram:
            history = jnp.full((b, total), -1, jnp.int32).at[:, :p].set(
                jnp.where(prompt_mask > 0, ids, -1))
        tok = next_token(logits, _step_keys(row_keys, 0), sampling, history, p)
        if history is not None:
            history = history.at[:, p].set(tok)
        return tok, cache, cache_mask, history

    def decode(state, cache, tok, cache_mask, pos0, slot0, step0, n_steps, done, history,
               row_keys, eos, chunk, sampling):
        model = nnx.merge(graphdef, state)

        def body(i, carry):
            cache, tok, done, history, out = carry
            h, cache = model.hidden_states(
                tok[:, None], cache_mask, (pos0 + i)[:, None], cache=cache, cache_index=slot0 + i)
            # history holds the fed token at slot0 + i, so slot0 + i + 1 slots are filled
            nxt = next_token(model.lm_logits(h)[:, 0], _step_keys(row_keys, step0 + i),
                             sampling, history, slot0 + i + 1)
            nxt = jnp.where(done, eos, nxt)  # finished rows keep emitting EOS
            if history is not None:
                history = history.at[:, slot0 + i + 1].set(nxt)
            return cache, nxt, done | (nxt == eos), history, out.at[:, i].set(nxt)

        out = jnp.zeros((tok.shape[0], chunk), jnp.int32)
        return jax.lax.fori_loop(0, n_steps, body, (cache, tok, done, history, out))

    return (jax.jit(prefill, static_argnames=("total", "sampling")),
            jax.jit(decode, static_argnames=("chunk", "sampling"), donate_argnames=("cache",)))


# ---------------------------------------------------------------- driver


@dataclass
class Sample:
    """One generated continuation: token_ids are the new tokens (EOS included when the model
    produced it); completion is their text without EOS and stop string."""

    prompt_index: int
    sample_index: int
    prompt: str
    completion: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


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


@dataclass
class _Row:
    """A sample being decoded, its prompt's ids and how much of its text was streamed."""

    sample: Sample
    ids: list[int]
    shown: int = 0

    def absorb(self, tokens: list[int], eos: int, max_new: int, stop: Sequence[str],
               tokenizer, on_text) -> None:
        """Append a chunk of new tokens; detect EOS, stop strings and length; stream the
        text that is final."""
        s, new = self.sample, self.sample.token_ids
        for t in tokens:
            new.append(t)
            if t == eos:
                s.finish_reason = "eos"
                break
        if s.finish_reason is None and not stop and on_text is None and len(new) < max_new:
            return  # nothing needs the text yet: decode once, when the row ends
        text = tokenizer.decode(new[:-1] if s.finish_reason == "eos" else new)
        cut = _stop_hit(text, stop)
        if cut >= 0:
            s.finish_reason = "stop"
            text = text[:cut]
            # keep the shortest prefix of the new tokens whose text holds a stop string
            n = next(n for n in range(1, len(new) + 1)
                     if _stop_hit(tokenizer.decode(new[:n]), stop) >= 0)
            del new[n:]
        elif s.finish_reason is None and len(new) >= max_new:
            s.finish_reason = "length"
        s.completion = text
        if on_text is not None:
            show = len(text) if s.finish_reason else _held_back(text, stop)
            if show > self.shown:
                on_text(s.prompt_index, s.sample_index, text[self.shown:show])
                self.shown = show


@dataclass
class Timing:
    """Where a generate call's time went: the first token (prefill, compiles included) of
    its first batch of rows, and the decoding of every token after each row's first."""

    first_token_s: float | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first token; None when there were none."""
        return self.decode_tokens / self.decode_s if self.decode_tokens else None


class Generator:
    """A model prepared for decoding (unrolled layers, adapters folded in, cast weights).

    Reuse one Generator for many calls: preparation may copy weights (scan-layers or LoRA
    models, `weights_dtype`), and compilations are cached per model structure and shape bucket.
    """

    def __init__(self, model: GPT2, tokenizer, *, weights_dtype: str | None = None):
        cfg = model.cfg
        if weights_dtype is not None and weights_dtype not in DTYPES:
            raise UserError(f"weights dtype {weights_dtype!r}: choose one of {', '.join(DTYPES)}")
        compute = weights_dtype or cfg.dtype
        if cfg.scan_layers or compute != cfg.dtype or cfg.lora_rank:
            from .lora import merge
            from .model import from_values
            from .params import flat, relayout
            from .run import lora_fields

            # the adapters are folded in once, not computed on every decoded token
            values = merge(cfg, relayout(flat(nnx.state(model, nnx.Param)), cfg.n_layer, False))
            plain = cfg.replace(scan_layers=False, dtype=compute, **lora_fields(None))
            model = from_values(plain, values)
        self.cfg, self.tokenizer = model.cfg, tokenizer
        self.graphdef, self.state = nnx.split(model)
        if weights_dtype and weights_dtype != "float32":
            # Stored in the compute dtype, so the per-use .astype in the model is a no-op.
            dt = JNP_DTYPES[weights_dtype]
            self.state = jax.tree.map(lambda a: a.astype(dt), self.state)
        self.eos_id = eos_id(tokenizer, cfg.eos_token_id)
        self.timing = Timing()

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
    ) -> list[Sample]:
        """Continue every prompt num_samples times; see `generate` for the arguments.

        `on_start(prompt_index, sample_index, prompt)` is called as each row starts.
        """
        sampling = (sampling or Sampling()).validate()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("no prompts given")
        if max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        if num_samples < 1 or batch_size < 1 or chunk < 1:
            raise UserError("num-samples, batch size and chunk must be >= 1")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                raise UserError(f"prompt {i} is empty; give every prompt some text")
        # The same encoding as training and eval: no special tokens, ids checked vs vocab.
        encoded = encode(self.tokenizer, list(prompts), self.cfg.vocab_size)
        for i, ids in enumerate(encoded):
            if not ids:
                raise UserError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
        ctx = self.cfg.n_positions
        longest = max(len(ids) for ids in encoded)
        if longest + max_new_tokens > ctx:
            raise UserError(
                f"the longest prompt has {longest} tokens; with max-new-tokens "
                f"{max_new_tokens} that exceeds the model's context of {ctx} tokens: "
                f"lower --max-new-tokens to at most {ctx - longest} or shorten the prompt")
        rows = [_Row(Sample(p, s, prompts[p]), encoded[p])
                for p in range(len(prompts)) for s in range(num_samples)]
        absorb = functools.partial(self._absorb, max_new=max_new_tokens,
                                   stop=tuple(s for s in stop if s), on_text=on_text)
        size = 1 if on_text is not None else batch_size  # streaming shows one row at a time
        self.timing = Timing()
        for start in range(0, len(rows), size):
            self._run(rows[start:start + size], sampling, max_new_tokens, seed, chunk, absorb,
                      on_start)
        return [r.sample for r in rows]

    def _run(self, rows: list[_Row], sampling, max_new, seed, chunk, absorb, on_start) -> None:
        """Decode one batch of rows to their end."""
        prefill, decode = _compiled(self.graphdef)
        ctx = self.cfg.n_positions
        longest = max(len(r.ids) for r in rows)
        p = max(longest, min(bucket(longest, ctx), ctx - max_new))
        ids = np.full((len(rows), p), self.eos_id, np.int32)  # prompts right-aligned
        mask = np.zeros((len(rows), p), np.int32)
        for i, r in enumerate(rows):
            ids[i, p - len(r.ids):] = r.ids
            mask[i, p - len(r.ids):] = 1
        base = jax.random.PRNGKey(seed)
        row_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(
            base, r.sample.prompt_index), r.sample.sample_index) for r in rows])
        if on_start is not None:
            for r in rows:
                on_start(r.sample.prompt_index, r.sample.sample_index, r.sample.prompt)
        t0 = time.perf_counter()
        tok, cache, cache_mask, history = prefill(self.state, ids, mask, row_keys,
                                                  bucket(p + max_new, ctx), sampling)
        absorb(rows, np.asarray(tok)[:, None])
        t1 = time.perf_counter()
        pos0 = jnp.asarray(mask.sum(1), jnp.int32)  # position of the first new token
        done = jnp.asarray([r.sample.finish_reason is not None for r in rows])
        step = 1
        while step < max_new and any(r.sample.finish_reason is None for r in rows):
            n = min(chunk, max_new - step)
            cache, tok, done, history, out = decode(
                self.state, cache, tok, cache_mask, pos0 + (step - 1), p + step - 1, step, n,
                done, history, row_keys, self.eos_id, chunk, sampling)
            absorb(rows, np.asarray(out)[:, :n])
            step += n
        t = self.timing
        t.first_token_s = t1 - t0 if t.first_token_s is None else t.first_token_s
        t.decode_tokens += sum(len(r.sample.token_ids) - 1 for r in rows)
        t.decode_s += time.perf_counter() - t1

    def _absorb(self, rows: list[_Row], new_tokens: np.ndarray, *, max_new, stop, on_text):
        for r, tokens in zip(rows, new_tokens, strict=True):
            if r.sample.finish_reason is None:
                r.absorb(tokens.tolist(), self.eos_id, max_new, stop, self.tokenizer, on_text)


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
) -> list[Sample]:
    """Continue each prompt `num_samples` times, to EOS, a `stop` string (cut from the
    completion) or max_new_tokens; `on_text(prompt_index, sample_index, text)` streams the
    text (rows then run one at a time). For repeated calls build a `Generator` once."""
    sampling = Sampling(greedy, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram)
    return Generator(model, tokenizer).generate(
        prompts, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop, seed=seed,
        num_samples=num_samples, batch_size=batch_size, on_text=on_text)
