"""The sampling chain against transformers' logits processors.

transformers applies, in this order, RepetitionPenaltyLogitsProcessor, then the warpers
TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper; the next token is drawn
from the softmax of what is left. gpt2jax's `next_token` follows that order. On the same
logits and history, the tokens that survive the filters and their renormalised
probabilities must be equal, and the tokens `next_token` draws must follow those
probabilities (a chi-square test over many draws with a fixed key: deterministic).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt2jax.generate import (
    Sampling,
    apply_repetition_penalty,
    next_token,
    top_k_filter,
    top_p_filter,
)

VOCAB = 96
SETTINGS = [
    Sampling(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3),
    Sampling(temperature=1.6, top_k=0, top_p=0.75, repetition_penalty=1.0),
    Sampling(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=0.8),  # < 1 rewards
]


def case():
    """Three rows of logits on a realistic scale and a token history per row."""
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=(3, VOCAB)) * 2.5).astype(np.float32)
    history = np.array([[3, 7, 7, 12, 40, 41], [0, 95, 3, 3, 50, 51], [5, 6, 7, 8, 9, 10]])
    seen = np.zeros((3, VOCAB), bool)
    np.put_along_axis(seen, history, True, axis=1)
    # the most likely token of row 0 is in its history, so the penalty changes the ranking
    seen[0, int(np.argmax(logits[0]))] = True
    history[0, 0] = int(np.argmax(logits[0]))
    return logits, history, seen


def reference_probs(logits, history, s: Sampling) -> np.ndarray:
    """transformers' processors in generate's order, then softmax (float64 for the test)."""
    import torch
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    procs.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        procs.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        procs.append(TopPLogitsWarper(s.top_p))
    out = procs(torch.tensor(history), torch.tensor(logits)).numpy().astype(np.float64)
    out = np.exp(out - out.max(-1, keepdims=True))
    return out / out.sum(-1, keepdims=True)


def chain(logits, seen, s: Sampling) -> np.ndarray:
    """gpt2jax's filters in next_token's order, renormalised."""
    x = apply_repetition_penalty(logits, seen, s.repetition_penalty) / s.temperature
    x = np.asarray(top_p_filter(top_k_filter(x, s.top_k), s.top_p), np.float64)
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


@pytest.mark.parametrize("s", SETTINGS, ids=["all", "temperature_top_p", "top_k_reward"])
def test_kept_tokens_and_probabilities_equal_transformers(s):
    logits, history, seen = case()
    want, got = reference_probs(logits, history, s), chain(logits, seen, s)
    for row in range(3):
        kept = np.flatnonzero(want[row] > 0)
        assert np.array_equal(np.flatnonzero(got[row] > 0), kept), row
        assert 1 < len(kept) < VOCAB  # the filters really cut, and not down to one token
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def chi_square_critical(dof: int) -> float:
    """The chi-square value exceeded with probability 1e-4 under the null hypothesis."""
    from scipy.stats import chi2

    return float(chi2.isf(1e-4, dof))


@pytest.mark.parametrize("s", SETTINGS, ids=["all", "temperature_top_p", "top_k_reward"])
def test_next_token_draws_follow_transformers_probabilities(s):
    """20,000 draws per row through `next_token` (the function decoding calls): never a
    token transformers filters out, and a chi-square statistic below the 1e-4 quantile
    (bins with an expected count under 5 are pooled, as the test requires)."""
    import jax

    logits, history, _ = case()
    want = reference_probs(logits, history, s)
    n = 20_000
    draw = jax.jit(lambda lg, hist, k: next_token(lg, k, s, hist))
    keys = jax.random.split(jax.random.key(123), 3 * n).reshape(3, n)
    for row in range(3):
        tokens = np.asarray(draw(np.repeat(logits[row][None], n, 0),
                                 np.repeat(history[row][None], n, 0), keys[row]))
        counts = np.bincount(tokens, minlength=VOCAB)
        assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want[row] > 0)), row
        expected = want[row] * n
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        if exp[-1] < 5:  # too few to stand as a bin: fold into the smallest big bin
            j = int(np.argmin(exp[:-1]))
            obs[j], exp[j] = obs[j] + obs[-1], exp[j] + exp[-1]
            obs, exp = obs[:-1], exp[:-1]
        stat = float(((obs - exp) ** 2 / exp).sum())
        assert stat < chi_square_critical(len(exp) - 1), (row, stat, len(exp))
