"""Optimizer: schedule values, the weight-decay mask, freezing, and gradient accumulation."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt2jax.config import OptimSection
from gpt2jax.errors import UserError
from gpt2jax.model import GPT2Config, create_model
from gpt2jax.optim import decays, make_optimizer, make_schedule
from gpt2jax.params import flat as flat_params
from gpt2jax.train import make_train_step

OPTIM = OptimSection(lr=1e-3, warmup_steps=1, weight_decay=0.01, clip_norm=1.0)

# No tokenizer is involved here, so a small vocabulary keeps the steps cheap.
# loss_chunk=0: the plain full-logits loss, the reference the chunked paths are tested against
TINY = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                  embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, loss_chunk=0)


@functools.cache
def tiny_setup():
    """(graphdef, params) of the freshly initialised tiny model, built without a mesh."""
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model(TINY, 0)))
        params = jax.jit(lambda: nnx.split(create_model(TINY, 0))[1])()  # one compile
    return graphdef, params


def lm_batch(accum: int, rows: int, length: int, vocab: int = 256, seed: int = 0) -> dict:
    """A packed-LM batch with a leading micro-batch axis, some loss weights zeroed."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (accum * rows, length + 1)).astype(np.int32)
    weights = (rng.random(tokens.shape) > 0.2).astype(np.float32)
    return {"tokens": tokens.reshape(accum, rows, -1), "weights": weights.reshape(accum, rows, -1)}


def run_steps(graphdef, params, optim: OptimSection, batches: list[dict], accum: int = 1,
              total: int = 10):
    """Apply the real train step to each batch; returns (params, list of losses)."""
    tx, schedule = make_optimizer(optim, total, params)
    step = jax.jit(make_train_step(graphdef, tx, False, accum, jax.random.key(0)))
    opt_state = tx.init(params)
    losses = []
    for i, b in enumerate(batches):
        params, opt_state, m = step(params, opt_state, b, jnp.int32(i))
        losses.append(float(m["loss"]))
    return params, losses


@functools.cache
def reference_run():
    """Two AdamW steps on one device with 8-row batches: (batches, params, losses).

    The baseline for gradient accumulation here and for the sharded runs in
    test_sharding.py (computed once per session).
    """
    graphdef, params = tiny_setup()
    batches = tuple(lm_batch(1, 8, 16, seed=10 + i) for i in range(2))
    new, losses = run_steps(graphdef, params, OPTIM, batches)
    return batches, flat_params(new), losses


def _lr(lr, s, w):  # the warmup ramp: lr * (s + 1) / (w + 1), never a zero first step
    return lr * (s + 1) / (w + 1)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_values_match_hand_computed(kind):
    lr, end, warm, total = 1e-3, 1e-4, 4, 20
    sched = make_schedule(lr, kind, warm, total, end)
    main_steps = total - warm

    def main(k):
        if kind == "constant":
            return lr
        frac = min(k, main_steps) / main_steps
        if kind == "linear":
            return lr + (end - lr) * frac
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))

    for s in (0, 1, 3):
        assert float(sched(s)) == pytest.approx(_lr(lr, s, warm), rel=1e-6)
    for s in (4, 7, 12, 19, 20, 30):
        assert float(sched(s)) == pytest.approx(main(s - warm), rel=1e-5, abs=1e-12), s
    if kind != "constant":
        assert float(sched(total)) == pytest.approx(end, rel=1e-5)
        assert float(sched(12)) < lr  # really decaying


def test_schedule_without_warmup_and_warmup_longer_than_run():
    sched = make_schedule(2e-3, "linear", 0, 10, 0.0)
    assert float(sched(0)) == pytest.approx(2e-3)
    assert float(sched(5)) == pytest.approx(1e-3)
    # warmup is clipped to total - 1 so the run's last step (4) still reaches the peak
    sched = make_schedule(1e-3, "cosine", 50, 5, 0.0)
    assert float(sched(3)) == pytest.approx(_lr(1e-3, 3, 4), rel=1e-6)
    assert float(sched(4)) == pytest.approx(1e-3, rel=1e-6)
    with pytest.raises(UserError, match="schedule"):
        make_schedule(1e-3, "step", 0, 10)


def test_decay_mask_by_name():
    assert decays("h.3.attn.c_attn_kernel") and decays("h.0.mlp.c_fc_kernel")
    assert decays("score.kernel") and decays("pool.query")
    for name in ("h.0.attn.c_attn_bias", "h.1.ln_1.scale", "h.1.ln_2.bias", "ln_f.scale",
                 "pool.out_bias"):
        assert not decays(name), name
    assert not decays("wte") and not decays("wpe")
    assert decays("wte", decay_embeddings=True) and decays("wpe", decay_embeddings=True)


def test_weight_decay_applies_only_to_masked_params():
    """With zero gradients AdamW's update is pure decay: p <- p * (1 - lr * wd)."""
    _, params = tiny_setup()
    lr, wd = 0.1, 0.5
    txs = [make_optimizer(OptimSection(lr=lr, schedule="constant", weight_decay=wd,
                                       clip_norm=0.0, decay_embeddings=emb), 10, params)[0]
           for emb in (False, True)]

    @jax.jit
    def decayed(params):  # both settings in one compiled function
        zeros = jax.tree.map(jnp.zeros_like, params)
        return [jax.tree.map(jnp.add, params, tx.update(zeros, tx.init(params), params)[0])
                for tx in txs]

    before = flat_params(params)
    for emb, out in zip((False, True), decayed(params), strict=True):
        after = flat_params(out)
        for name, p in before.items():
            expect = p * (1 - lr * wd) if decays(name, emb) else p
            np.testing.assert_allclose(after[name], expect, rtol=1e-6, err_msg=name)
        assert not np.array_equal(after["h.0.mlp.c_fc_kernel"], before["h.0.mlp.c_fc_kernel"])
        assert np.array_equal(after["h.0.ln_1.scale"], before["h.0.ln_1.scale"])
        assert np.array_equal(after["wte"], before["wte"]) != emb


def test_freeze_keeps_matching_params_bit_identical():
    graphdef, params = tiny_setup()
    optim = OptimSection(lr=1e-2, warmup_steps=0, freeze=[r"^wte$", r"^h\.0\.", r"ln_f"])
    new, losses = run_steps(graphdef, params, optim, [lm_batch(1, 4, 16, seed=i)
                                                      for i in range(3)])
    before, after = flat_params(params), flat_params(new)
    frozen = [n for n in before if n == "wte" or n.startswith("h.0.") or "ln_f" in n]
    assert len(frozen) == 15
    for name in before:
        same = np.array_equal(np.asarray(before[name]), np.asarray(after[name]))
        assert same == (name in frozen), name
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match="freezes every parameter"):
        make_optimizer(OptimSection(freeze=[".*"]), 10, params)


def test_grad_accumulation_equals_the_big_batch_step():
    graphdef, params = tiny_setup()
    big, p_big, l_big = reference_run()
    split = [{k: v.reshape(2, 4, -1) for k, v in b.items()} for b in big]
    p_acc, l_acc = run_steps(graphdef, params, OPTIM, split, accum=2)
    np.testing.assert_allclose(l_acc, l_big, rtol=1e-6)
    a, b = p_big, flat_params(p_acc)
    # Summation order differs (~1e-8 in the gradients); Adam divides by sqrt(v), which
    # magnifies that on near-zero gradients to a few 1e-6 on single elements (measured
    # 5.3e-6 with lr 1e-3). Nearly every element agrees to 1e-6; none is off by 2e-5.
    diffs = np.concatenate([np.abs(np.asarray(b[n]) - np.asarray(a[n])).ravel() for n in a])
    assert diffs.max() < 2e-5, diffs.max()
    assert (diffs > 1e-6).mean() < 1e-4, (diffs > 1e-6).sum()
    assert not np.array_equal(a["wte"], flat_params(params)["wte"])  # training happened
