"""`gpt2jax bench`: FLOP accounting by hand, every output field, transformers side by side.

Speed is never asserted (the machine is shared); the tests check the bookkeeping.
"""

from __future__ import annotations

import os
import sys

import pytest

# A tiny model with the real vocabulary, so --decode can use the GPT-2 tokenizer.
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-positions", "64",
        "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1",
        "--peak-size", "128"]


def test_flops_per_token_equals_hand_calculation():
    from gpt2jax.bench import decode_flops_per_token, flops_per_token, matmul_params
    from gpt2jax.model import GPT2Config, param_count

    cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10, n_positions=16)
    # per layer: c_attn 8*24 + attn c_proj 8*8 + c_fc 8*32 + mlp c_proj 32*8 = 768
    # two layers 1536, tied LM head 10*8 = 80 -> N = 1616 matmul parameters
    assert matmul_params(cfg) == 1616
    # 6N = 9696; attention 12 * layers 2 * n_embd 8 * seq 4 = 768
    assert flops_per_token(cfg, seq_len=4) == 9696 + 768
    # forward only, 20 cache slots: 2N + 4 * 2 * 8 * 20
    assert decode_flops_per_token(cfg, context=20) == 3232 + 1280
    # N is param_count without wpe (16*8), the biases (2 * (24+8+32+8)) and LayerNorms
    # (2 layers * 2 * 16 + ln_f 16)
    assert matmul_params(cfg) == param_count(cfg) - 128 - 144 - 80
    # GPT-2 small at 1024 tokens: the commonly quoted ~0.85 GFLOP/token (6 * 124M + attn)
    small = GPT2Config()
    assert flops_per_token(small, 1024) == 6 * (12 * 12 * 768**2 + 50257 * 768) \
        + 12 * 12 * 768 * 1024


@pytest.fixture(scope="module")
def vs_hf(cli):
    # bfloat16: the float32 default is the same code with another dtype. --loss-chunk 16
    # makes two chunks of the 32 tokens (a bf16 train step whose fused LM loss is a single
    # chunk fails on CPU: "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")
    res = cli("bench", *TINY, "--dtype", "bfloat16", "--loss-chunk", "16", "--rounds", "2",
              "--vs", "hf,keras", "--decode", "--decode-tokens", "8", "--eval", "--json")
    assert res.code == 0, res.err
    return res.json


def test_bench_json_has_every_field(vs_hf):
    from gpt2jax.bench import flops_per_token
    from gpt2jax.model import GPT2Config

    r = vs_hf
    assert set(r) >= {"config", "flops_per_token", "peak_flops", "peak_flops_rounds",
                      "peak_matmul", "jax", "hf", "ratio", "decode", "device", "jax_version",
                      "env", "date"}
    c = r["config"]
    assert (c["n_layer"], c["n_embd"], c["n_head"], c["vocab_size"], c["n_positions"],
            c["batch_size"], c["seq_len"], c["dtype"], c["steps"], c["rounds"]) == \
        (2, 32, 2, 50257, 64, 2, 16, "bfloat16", 2, 2)
    assert 1 <= c["settle_rounds"] <= 8  # rounds until the step stopped faulting memory in
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    assert r["flops_per_token"] == flops_per_token(cfg, 16)
    assert len(r["peak_flops_rounds"]) == 2 and r["peak_flops"] > 0
    assert r["peak_flops"] == max(r["peak_flops_rounds"]) and r["peak_consistent"]
    assert r["jax"]["malloc"] in ("system", "hugepages", "keep", "custom")  # the policy run
    j = r["jax"]
    for key in ("tokens_per_sec", "step_seconds", "cpu_seconds_per_step", "compile_seconds",
                "first_step_seconds", "flops_per_token", "achieved_flops", "mfu",
                "peak_memory_bytes"):
        assert isinstance(j[key], int | float) and j[key] > 0, key
    assert isinstance(j["page_faults_per_step"], int) and j["page_faults_per_step"] >= 0
    assert j["peak_memory_source"] in ("process_max_rss", "device_peak_bytes_in_use")
    assert len(j["step_seconds_rounds"]) == 2 and len(j["mfu_rounds"]) == 2
    # the derived numbers are consistent with each other
    assert j["tokens_per_sec"] == pytest.approx(2 * 16 / j["step_seconds"], rel=1e-3)
    assert j["mfu"] == pytest.approx(j["achieved_flops"] / r["peak_flops"], abs=1e-4)
    assert r["device"].startswith("cpu")


def test_bench_vs_hf_reports_both_sides_and_ratio(vs_hf):
    r = vs_hf
    h = r["hf"]
    for key in ("tokens_per_sec", "step_seconds", "cpu_seconds_per_step", "mfu",
                "first_step_seconds"):
        assert h[key] > 0, key
    assert isinstance(h["page_faults_per_step"], int) and h["page_faults_per_step"] >= 0
    assert h["torch_device"] == "cpu" and len(h["ratio_rounds"]) == 2
    assert h["torch_version"].startswith("2.") and h["torch_threads"] >= 1
    # transformers runs in its own process, in the environment the user started us with
    assert h["env"] == {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}
    assert r["ratio"] == pytest.approx(r["jax"]["tokens_per_sec"] / h["tokens_per_sec"],
                                       rel=1e-2)
    d = r["decode"]
    assert d["new_tokens"] == 8 and d["jax_tokens_per_sec"] > 0 and d["hf_tokens_per_sec"] > 0
    assert d["ratio"] == pytest.approx(d["jax_tokens_per_sec"] / d["hf_tokens_per_sec"],
                                       rel=1e-2)


def test_bench_eval_times_both_eval_paths_against_transformers(vs_hf):
    """--eval: the LM perplexity forward (tokens/s) and the classification forward
    (examples/s) of ours and of transformers under no_grad, in the same rounds."""
    e = vs_hf["eval"]
    assert set(e) == {"lm", "classification"}
    for kind, unit in (("lm", "tokens"), ("classification", "examples")):
        ours, theirs = e[kind][f"jax_{unit}_per_sec"], e[kind][f"hf_{unit}_per_sec"]
        assert ours > 0 and theirs > 0
        assert e[kind]["ratio"] == pytest.approx(ours / theirs, rel=1e-2)
    # a forward over the batch (2 x 16 tokens) gives 16x as many tokens as examples
    lm, cls = e["lm"]["jax_tokens_per_sec"], e["classification"]["jax_examples_per_sec"]
    assert lm > cls
    from gpt2jax.bench import format_table

    assert "eval lm (forward, no grad)" in format_table(vs_hf)


def test_bench_vs_keras_runs_kerashub_in_the_same_rounds(vs_hf):
    """KerasHub's GPT2CausalLM (Keras 3, JAX backend) is the second peer of one invocation."""
    r = vs_hf
    k = r["keras"]
    for key in ("tokens_per_sec", "step_seconds", "cpu_seconds_per_step", "first_step_seconds"):
        assert k[key] > 0, key
    assert (k["keras_version"], k["keras_hub_version"], k["keras_backend"]) == (
        "3.15.1", "0.32.0", "jax")
    assert k["compute"] == "mixed_bfloat16" and len(k["ratio_rounds"]) == 2
    assert k["env"] == {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}
    assert r["ratios"]["keras"] == pytest.approx(
        r["jax"]["tokens_per_sec"] / k["tokens_per_sec"], rel=1e-2)
    assert r["ratios"]["hf"] == r["ratio"]
    # the same FLOPs per token on every side: one shape
    assert k["flops_per_token"] == r["jax"]["flops_per_token"] == r["hf"]["flops_per_token"]


def test_bench_table_with_and_without_peer(vs_hf):
    from gpt2jax.bench import format_table

    both = format_table(vs_hf)
    assert "transformers" in both and f"{vs_hf['ratio']:.2f}x" in both and "decode" in both
    assert "KerasHub" in both
    alone = format_table({**vs_hf, "hf": None, "keras": None, "ratio": None, "ratios": {},
                          "decode": None, "eval": None})
    assert "gpt2jax" in alone and "MFU" in alone and "transformers" not in alone


def test_bench_bad_input_is_a_user_error(cli, monkeypatch):
    res = cli("bench", "--n-positions", "32", "--seq-len", "64")
    assert res.code == 2 and "--seq-len 64 exceeds" in res.last_err
    res = cli("bench", "--steps", "0")
    assert res.code == 2 and "--steps must be >= 1" in res.last_err
    res = cli("bench", "--vocab-size", "1000", "--decode")
    assert res.code == 2 and "--decode uses the GPT-2 tokenizer" in res.last_err
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    res = cli("bench", *TINY, "--vs", "hf")
    assert res.code == 2 and "pip install 'gpt2jax[bench]'" in res.last_err
    res = cli("bench", *TINY, "--vs", "hf,tf")
    assert res.code == 2 and "unknown peer 'tf'; choose from hf, keras" in res.last_err


def test_bench_worker_failures_are_user_errors():
    """The transformers worker: a failing request answers with the error (the worker
    lives on); a dead worker is reported with its exit status, not a pipe traceback."""
    from gpt2jax.errors import UserError
    from gpt2jax.peers import Worker

    w = Worker("hf")
    try:
        with pytest.raises(UserError, match="the transformers side failed: TypeError"):
            w.call("train", n=1)  # before "init": nothing to train
        w.proc.kill()
        w.proc.wait()
        with pytest.raises(UserError, match="worker process exited with status -9"):
            w.call("train", n=1)
    finally:
        w.close()
    assert not os.path.exists(w.tmp.name)  # its scratch directory is gone


def test_mfu_is_never_over_100_percent():
    """A probe that read below what the step achieved (a busy machine) gives no MFU and a
    line saying why, instead of e.g. 'MFU 168.5%'."""
    from gpt2jax.bench import _per_round_mfu, _side, format_table

    use = [(0.5, 10)]
    side = _side(100, 1.0, 10, peak=500.0, rounds=[1.0], use=use)  # 1,000 FLOP/s achieved
    assert side["achieved_flops"] == 1000 and side["mfu"] is None
    assert _side(100, 1.0, 10, peak=4000.0, rounds=[1.0], use=use)["mfu"] == 0.25
    assert _per_round_mfu(100, 10, [1.0, 1.0], [500.0, 2000.0]) == [None, 0.5]
    cfg = {"n_layer": 1, "n_embd": 8, "n_head": 1, "vocab_size": 10, "batch_size": 1,
           "seq_len": 4, "dtype": "float32", "rounds": 1, "steps": 1}
    r = {"device": "cpu", "jax_version": "x", "date": "d", "config": cfg,
         "flops_per_token": 10, "peak_flops": 500, "peak_matmul": {"size": 16,
         "dtype": "float32"}, "peak_consistent": False, "ratio": None, "decode": None,
         "hf": None, "jax": {**side, "compile_seconds": 1.0, "peak_memory_bytes": 2**20,
                             "peak_memory_source": "process_max_rss"}}
    text = format_table(r)
    assert "MFU not reported: the matmul probe read below" in text and "%" not in text


def test_bf16_decode_reports_the_bf16_weights_it_decodes_with(vs_hf):
    """--dtype bfloat16 --decode: the decoder's weights are bfloat16 (a Generator built as
    the benchmark builds it holds bf16 arrays) and the JSON says so."""
    import jax
    import jax.numpy as jnp

    from gpt2jax.generate import Generator
    from gpt2jax.model import GPT2Config, create_model
    from gpt2jax.tokenizer import gpt2_tokenizer

    assert vs_hf["decode"]["weights_dtype"] == "bfloat16"
    assert vs_hf["hf"]["compute"] == "bfloat16 autocast"
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    gen = Generator(create_model(cfg, 0), gpt2_tokenizer(), weights_dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(gen.state)} == {jnp.dtype(jnp.bfloat16)}


def test_peers_run_under_the_same_allocator_tunables_as_gpt2jax():
    """A fair comparison: a worker inherits gpt2jax's GLIBC_TUNABLES (after the malloc
    restart), so `GPT2JAX_MALLOC=keep gpt2jax bench --vs hf` gives both sides keep's."""
    from gpt2jax import malloc
    from gpt2jax.peers import worker_env

    keep = malloc.restart_env({"GPT2JAX_MALLOC": "keep"}, "linux",
                              thp_path="/sys/kernel/mm/transparent_hugepage/enabled")
    ours = keep or {"GLIBC_TUNABLES": ":".join(malloc.POLICIES["keep"])}
    env = worker_env(ours)
    assert env["GLIBC_TUNABLES"] == ours["GLIBC_TUNABLES"] and env["KERAS_BACKEND"] == "jax"
    assert malloc.describe(env) == "keep"
