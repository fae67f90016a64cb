"""Generation: parity with transformers' generate, KV-cache logits, sampling filters, CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gpt2jax.errors import UserError
from gpt2jax.generate import (
    Generator,
    Sampling,
    _held_back,
    apply_repetition_penalty,
    bucket,
    generate,
    sample_categorical,
    top_k_filter,
    top_p_filter,
)

# One sampling setting for all sampling tests: each setting is a compilation.
SAMPLING = Sampling(temperature=1.5, top_k=100, top_p=0.95, repetition_penalty=1.2)
PROMPTS = ["Hello there, my", "A", "The quick brown fox jumps over the lazy dog and"]


@pytest.fixture(scope="module")
def varied(hf_lm_dir, tmp_path_factory):
    """The shared tiny GPT-2 with its matrices scaled 15x (init std 0.3), so greedy text does
    not repeat one token; same config, so compilations are shared with hf_lm_dir models.
    (path, torch model, our model, tokenizer, Generator)."""
    import copy

    import torch

    from gpt2jax.run import load_model
    from gpt2jax.tokenizer import gpt2_tokenizer

    hf = copy.deepcopy(hf_lm_dir[1])
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(15.0)
    path = tmp_path_factory.mktemp("varied_lm")
    hf.save_pretrained(str(path))
    gpt2_tokenizer().save_pretrained(str(path))
    model, tok, _ = load_model(str(path))
    return path, hf, model, tok, Generator(model, tok)


def _hf_greedy(hf, ids: list[int], n: int, **kw) -> list[int]:
    import torch

    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, pad_token_id=50256, **kw)
    return out[0, len(ids):].tolist()


def decoded_logits(monkeypatch, gen, prompts, **opts):
    """gen.generate's samples and the logits each of its steps picked from, (rows, steps,
    vocab), recorded from inside the jitted prefill and decode loop."""
    import functools

    import jax

    from gpt2jax import generate as G

    steps, pick = [], G.next_token

    def recording(logits, *args):
        jax.debug.callback(lambda x: steps.append(np.asarray(x)), logits, ordered=True)
        return pick(logits, *args)

    monkeypatch.setattr(G, "next_token", recording)
    monkeypatch.setattr(G, "_compiled", functools.lru_cache(G._compiled.__wrapped__))  # retrace
    samples = gen.generate(prompts, **opts)
    monkeypatch.undo()
    return samples, np.stack(steps, axis=1)


def test_greedy_batch_equals_transformers_and_cache_logits_equal_full_forward(varied,
                                                                               monkeypatch):
    _, hf, model, tok, gen = varied
    samples, logits = decoded_logits(monkeypatch, gen, PROMPTS, sampling=Sampling(greedy=True),
                                     max_new_tokens=10)
    assert len({tuple(s.token_ids) for s in samples}) == 3  # the prompts really differ
    encoded = [tok.encode(p) for p in PROMPTS]
    for s, ids in zip(samples, encoded, strict=True):
        ref = _hf_greedy(hf, ids, 10)
        assert s.token_ids == ref
        assert s.finish_reason == ("eos" if ref[-1] == tok.eos_token_id else "length")
        assert s.completion == tok.decode(ref, skip_special_tokens=True)
    # KV-cache logits at every step == one full forward over prompt + new tokens
    # (right padded: causal attention keeps the real positions exact).
    rows = [ids + s.token_ids for ids, s in zip(encoded, samples, strict=True)]
    batch = np.full((len(rows), max(map(len, rows))), tok.eos_token_id, np.int32)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r
    full = np.asarray(model(batch))
    for i, (s, ids) in enumerate(zip(samples, encoded, strict=True)):
        want = full[i, len(ids) - 1: len(ids) - 1 + len(s.token_ids)]
        np.testing.assert_allclose(logits[i, :len(s.token_ids)], want, atol=2e-4, rtol=1e-4)


def test_greedy_with_repetition_penalty_equals_transformers(hf_lm_dir):
    from gpt2jax.run import load_model

    path, hf = hf_lm_dir  # unscaled: its greedy text repeats, which the penalty must stop
    model, tok, _ = load_model(str(path))
    samples = generate(model, tok, PROMPTS, greedy=True, repetition_penalty=3.0,
                       max_new_tokens=10)
    for s, prompt in zip(samples, PROMPTS, strict=True):
        assert s.token_ids == _hf_greedy(hf, tok.encode(prompt), 10, repetition_penalty=3.0)
    plain = _hf_greedy(hf, tok.encode(PROMPTS[0]), 10)
    assert len(set(plain)) < len(plain)  # without the penalty it repeats ...
    assert samples[0].token_ids != plain  # ... and the penalty changed that


@pytest.mark.parametrize("n", [2, 3])
def test_greedy_with_no_repeat_ngram_equals_transformers(hf_lm_dir, n):
    """Batched (left-padded prompts) and over several decode chunks: the n-gram history
    spans the prompt, the prefill token and every chunk."""
    from gpt2jax.run import load_model

    path, hf = hf_lm_dir  # its plain greedy text loops, so the rule must change it
    model, tok, _ = load_model(str(path))
    samples = generate(model, tok, PROMPTS, greedy=True, no_repeat_ngram=n, max_new_tokens=20)
    for s, prompt in zip(samples, PROMPTS, strict=True):
        ids = tok.encode(prompt)
        assert s.token_ids == _hf_greedy(hf, ids, 20, no_repeat_ngram_size=n)
        seq = ids + s.token_ids
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        assert len(grams) == len(set(grams))  # hand check: no n-gram twice
    plain = _hf_greedy(hf, tok.encode(PROMPTS[0]), 20)
    assert samples[0].token_ids != plain


def test_no_repeat_ngram_filter_equals_transformers_processor():
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from gpt2jax.generate import ban_repeated_ngrams

    rng = np.random.default_rng(3)
    hist = rng.integers(0, 6, size=(4, 30))  # a 6-token vocabulary repeats often
    logits = rng.normal(size=(4, 40)).astype(np.float32)
    for n in (1, 2, 3, 4):
        for length in (n - 1, 9, 30):
            want = NoRepeatNGramLogitsProcessor(n)(torch.tensor(hist[:, :length]),
                                                   torch.tensor(logits)).numpy()
            padded = np.full((4, 34), -1)
            padded[:, :length] = hist[:, :length]
            got = np.asarray(ban_repeated_ngrams(logits, padded, length, n))
            np.testing.assert_array_equal(got, want)
    # left padding (-1) is no token: nothing is banned by an n-gram that touches it
    padded = np.array([[-1, -1, 5, 5, 5]])
    got = np.asarray(ban_repeated_ngrams(np.zeros((1, 8), np.float32), padded, 5, 2))
    assert np.isinf(got[0, 5]) and np.isfinite(np.delete(got[0], 5)).all()


def test_scan_layers_model_decodes_the_same(varied):
    from gpt2jax.run import load_model

    path, _, _, tok, gen = varied
    scanned, _, _ = load_model(str(path), scan_layers=True)  # unstacked once for decoding
    opts = dict(sampling=Sampling(greedy=True), max_new_tokens=12)
    (want,) = gen.generate(["The quick brown fox"], **opts)
    (got,) = Generator(scanned, tok).generate(["The quick brown fox"], **opts)
    assert got.token_ids == want.token_ids


def test_sampling_is_reproducible_and_independent_of_the_batch(varied):
    gen = varied[4]
    opts = dict(sampling=SAMPLING, max_new_tokens=8)
    a = gen.generate(PROMPTS, seed=7, num_samples=2, **opts)
    b = gen.generate(PROMPTS, seed=7, num_samples=2, batch_size=1, **opts)
    c = gen.generate(PROMPTS, seed=8, num_samples=2, **opts)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    assert [(s.prompt_index, s.sample_index) for s in a] == [(p, k) for p in range(3)
                                                             for k in range(2)]
    assert a[0].token_ids != a[1].token_ids  # two samples of one prompt differ


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2], np.float32)  # order: 1, 3, 4, 2, 0
    logits = np.log(probs)[None]
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x)[0])).tolist())  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 0)) == set(range(5))
    assert kept(top_p_filter(logits, 0.3)) == {1}
    assert kept(top_p_filter(logits, 0.6)) == {1, 3}  # 0.4 < 0.6 -> the next one is needed
    assert kept(top_p_filter(logits, 0.7)) == {1, 3, 4}
    assert kept(top_p_filter(logits, 0.9)) == {1, 3, 4, 2}
    assert kept(top_p_filter(logits, 1.0)) == set(range(5))
    for p in (0.3, 0.6, 0.7, 0.9):
        ref = TopPLogitsWarper(p)(None, torch.tensor(logits))
        assert kept(top_p_filter(logits, p)) == kept(ref.numpy())
    ref = TopKLogitsWarper(3)(None, torch.tensor(logits))
    assert kept(top_k_filter(logits, 3)) == kept(ref.numpy())
    # kept logits are unchanged
    np.testing.assert_array_equal(np.asarray(top_p_filter(logits, 0.7))[0, [1, 3, 4]],
                                  logits[0, [1, 3, 4]])


def test_sampling_follows_the_filtered_distribution():
    import jax

    logits = np.array([np.log(0.1), -np.inf, np.log(0.6), np.log(0.3)], np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(sample_categorical, (0, None)))(keys, logits))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.6, 0.3], atol=0.015)
    assert freq[1] == 0.0  # a filtered-out (-inf) token is never drawn
    ties = np.array([[1.0, 2.0, 2.0, 3.0, -1.0]], np.float32)
    assert np.isfinite(np.asarray(top_k_filter(ties, 2))).tolist() == [[False, True, True, True,
                                                                         False]]


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    ids = np.array([[3, 7, 7, 12], [0, 49, 3, 3]])
    seen = np.zeros((2, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ours = np.asarray(apply_repetition_penalty(logits, seen, 1.3))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert not np.allclose(ours, logits)


def test_stop_strings_and_streaming(varied):
    gen = varied[4]
    (free,) = gen.generate(["The quick brown fox"], sampling=Sampling(greedy=True),
                           max_new_tokens=12)
    text = free.completion
    stop = text[len(text) // 2: len(text) // 2 + 3]
    pieces: list[str] = []
    (s,) = gen.generate(["The quick brown fox"], sampling=Sampling(greedy=True),
                        max_new_tokens=12, stop=[stop],
                        on_text=lambda p, k, t: pieces.append(t))
    assert s.finish_reason == "stop"
    assert s.completion == text[: text.find(stop)]
    assert s.token_ids == free.token_ids[: len(s.token_ids)]
    assert stop in gen.tokenizer.decode(s.token_ids)
    assert stop not in gen.tokenizer.decode(s.token_ids[:-1])
    assert "".join(pieces) == s.completion  # the stream never showed the stop string
    assert _held_back("abc\ufffd", ()) == 3
    assert _held_back("hello wor", ("world",)) == 6
    assert _held_back("hello", ("xyz",)) == 5


def test_bucket():
    assert [bucket(n, 1024) for n in (1, 16, 17, 40, 64, 65, 130)] == [16, 16, 32, 64, 64,
                                                                        128, 192]
    assert bucket(100, 80) == 80


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[""]), "empty"),
        (dict(max_new_tokens=100), "context"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top-k"),
        (dict(max_new_tokens=0), "max-new-tokens"),
    ],
)
def test_bad_input_is_a_user_error(varied, kwargs, match):
    model, tok = varied[2], varied[3]
    kwargs = {"prompts": ["hi"], **kwargs}
    with pytest.raises(UserError, match=match):
        generate(model, tok, kwargs.pop("prompts"), **kwargs)


def test_cli_generate_json(varied, cli, tmp_path):
    path = varied[0]
    f = tmp_path / "prompts.txt"
    f.write_text("Hello there\n\nThe quick brown fox\n")
    r = cli("generate", "--model", path, "--prompts-file", f, "--num-samples", "2",
            "--max-new-tokens", "8", "--seed", "1", "--temperature", "1.5", "--top-k", "100",
            "--top-p", "0.95", "--repetition-penalty", "1.2", "--batch-size", "1", "--json")
    assert r.code == 0, r.err
    samples = r.json["samples"]
    assert [(s["prompt_index"], s["sample_index"]) for s in samples] == [(0, 0), (0, 1), (1, 0),
                                                                         (1, 1)]
    for s in samples:
        assert set(s) == {"prompt_index", "sample_index", "prompt", "completion", "token_ids",
                          "finish_reason"}
        assert 1 <= len(s["token_ids"]) <= 8 and s["finish_reason"] in ("eos", "stop", "length")
    assert samples[2]["prompt"] == "The quick brown fox"
    assert r.json["first_token_s"] > 0 and r.json["decode_tokens_per_s"] > 0


def test_cli_generate_streams_text(varied, cli):
    path, _, _, tok, gen = varied
    (want,) = gen.generate(["The quick brown fox"], sampling=Sampling(greedy=True),
                           max_new_tokens=12)
    r = cli("generate", "--model", path, "--prompt", "The quick brown fox", "--greedy",
            "--max-new-tokens", "12")
    assert r.code == 0, r.err
    assert r.out == "The quick brown fox" + want.completion + "\n"
    n = len(want.token_ids)
    summary = re.fullmatch(rf"\[{n} tokens in [\d.]+ s: first token after ([\d.]+) s, then "
                           r"([\d.]+) tokens/s; finish: (\w+)\]", r.err.strip().splitlines()[-1])
    assert summary and summary[3] == want.finish_reason, r.err
    assert float(summary[2]) > 0  # the first token may take under 5 ms, compiled already


@pytest.mark.parametrize(
    "extra",
    [
        ("--prompt", "", "--greedy"),
        ("--prompt", "hi", "--max-new-tokens", "1000"),
        ("--prompt", "hi", "--top-p", "0"),
        ("--prompt", "hi", "--temperature", "0"),
        ("--prompt", "hi", "--top-k", "-2"),
        ("--prompts-file", "/nonexistent/prompts.txt"),
    ],
)
def test_cli_generate_bad_input_exits_2(varied, cli, extra):
    r = cli("generate", "--model", varied[0], *extra)
    assert r.code == 2
    assert r.last_err.startswith("gpt2jax: error:")


def test_second_generate_command_loads_its_programs_from_the_compile_cache(hf_lm_dir, tmp_path):
    """Two `gpt2jax generate` processes with the same shapes: the first compiles and writes
    the cache, the second loads every program it would compile and writes nothing."""
    import os
    import subprocess
    import sys

    from gpt2jax import compile_cache

    cache = tmp_path / "xla"
    # every program is written (a loaded machine must not push one under the threshold)
    env = {**os.environ, compile_cache.ENV: str(cache), compile_cache.MIN_ENV: "0"}
    cmd = [sys.executable, "-m", "gpt2jax", "generate", "--model", str(hf_lm_dir[0]),
           "--prompt", "Hello there", "--max-new-tokens", "12", "--greedy"]
    runs = []
    for _ in range(2):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append((r.stdout, r.stderr.strip().splitlines()[-1],
                     sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))))
    (out1, line1, files1), (out2, line2, files2) = runs
    assert out1 == out2  # the same text from loaded programs
    compiled = int(line1.split(" loaded, ")[1].split()[0])
    assert line1.startswith("compile cache: 0 programs loaded") and compiled >= 2  # prefill, decode
    assert len(files1) == compiled
    assert line2.startswith(f"compile cache: {compiled} programs loaded, 0 compiled")
    assert files2 == files1
    assert compile_cache.location({compile_cache.ENV: "off"}) is None
    assert str(compile_cache.location({"GPT2JAX_CACHE": "/c"})) == "/c/xla"
