"""The custom-VJP kernels (gpt2jax/kernels.py; docs/perf-notes.md sections 3-6) against
the plain formulas beside them.

`attention_core`, `tied_head`, `linear` and `layer_norm` carry hand-written backward
passes. Their gradients must equal jax.grad of the plain formulas (float32, 1e-5 relative
to the largest entry; measured around 1e-7), alone and inside the whole model (padding
masks, attention dropout with the same keep mask, scale_attn_by_inverse_layer_idx,
scan_layers, a classification head), and a train step sharded with tensor parallelism
must match a one-device step that uses the plain formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_optim import OPTIM, reference_run, tiny_setup
from test_sharding import sharded_run

from gpt2jax import kernels
from gpt2jax import model as model_mod
from gpt2jax.kernels import attention_core, layer_norm, linear, tied_head
from gpt2jax.kernels import attention_core_reference as ref_attention
from gpt2jax.kernels import layer_norm_reference as ref_layer_norm
from gpt2jax.kernels import linear_reference as ref_linear
from gpt2jax.kernels import tied_head_reference as ref_head
from gpt2jax.model import GPT2Config, create_model
from gpt2jax.optim import make_optimizer
from gpt2jax.params import flat as flat_params
from gpt2jax.sharding import make_mesh


def assert_trees_close(got, want, rel=1e-5):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = max(float(np.abs(w).max()), 1e-12)
        np.testing.assert_allclose(g, w, rtol=0, atol=rel * scale, err_msg=str(path))


def _qkv(b=2, h=3, t=7, k=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, kk, v = (jax.random.normal(keys[i], (b, h, t, k)) for i in range(3))
    cot = jax.random.normal(keys[3], (b, h, t, k))  # a random upstream gradient
    return q, kk, v, cot


def _causal(t, key_mask=None):
    return model_mod.attention_mask_bias(t, t, key_mask)


@pytest.mark.parametrize("case", ["causal", "padding", "dropout", "padding+dropout"])
def test_attention_core_gradients_match_plain_formula(case):
    q, k, v, cot = _qkv()
    b, h, t, _ = q.shape
    key_mask = None
    if "padding" in case:  # row 0 left-padded by 3 (fully masked query rows), row 1 right
        key_mask = jnp.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    mask = _causal(t, key_mask)
    keep, rate = None, 0.0
    if "dropout" in case:
        rate = 0.3
        keep = jax.random.bernoulli(jax.random.key(5), 1 - rate, (b, h, t, t))
        assert 0 < float(keep.mean()) < 1
    scale = jnp.float32(0.37)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, scale, keep, rate) * cot)

    np.testing.assert_allclose(attention_core(q, k, v, mask, scale, keep, rate),
                               ref_attention(q, k, v, mask, scale, keep, rate), atol=1e-6)
    got = jax.jit(jax.grad(loss(attention_core), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref_attention), argnums=(0, 1, 2))(q, k, v)
    assert_trees_close(got, want)
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in got)  # not trivially zero


def test_attention_core_bfloat16_keeps_dtypes():
    q, k, v, cot = (a.astype(jnp.bfloat16) for a in _qkv(seed=1))
    mask = _causal(q.shape[2])
    scale = jnp.float32(0.35)
    out, vjp = jax.vjp(lambda q, k, v: attention_core(q, k, v, mask, scale, None, 0.0), q, k, v)
    assert out.dtype == jnp.bfloat16
    grads = vjp(cot)
    want = jax.grad(lambda q, k, v: jnp.sum(
        ref_attention(q, k, v, mask, scale, None, 0.0).astype(jnp.float32) * cot), (0, 1, 2))(
        q, k, v)
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert_trees_close(g, w, rel=3e-2)


def test_tied_head_gradients_match_plain_formula():
    keys = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(keys[0], (12, 16))
    w = jax.random.normal(keys[1], (97, 16))
    cot = jax.random.normal(keys[2], (12, 97))
    np.testing.assert_allclose(tied_head(h, w), ref_head(h, w), atol=1e-5)
    got = jax.jit(jax.grad(lambda h, w: jnp.sum(tied_head(h, w) * cot), (0, 1)))(h, w)
    want = jax.grad(lambda h, w: jnp.sum(ref_head(h, w) * cot), (0, 1))(h, w)
    assert_trees_close(got, want)


@pytest.mark.parametrize("shape", [(12, 16), (2, 5, 16)])
def test_linear_and_layer_norm_gradients_match_plain_formulas(shape):
    keys = jax.random.split(jax.random.key(4), 6)
    x = jax.random.normal(keys[0], shape)
    w = jax.random.normal(keys[1], (16, 24))
    b = jax.random.normal(keys[2], (24,))
    scale = 1.0 + jax.random.normal(keys[3], (16,))
    bias = jax.random.normal(keys[4], (16,))
    cot = jax.random.normal(keys[5], (*shape[:-1], 24))

    def loss(lin, ln):
        return lambda x, w, b, s, c: jnp.sum(lin(ln(x, s, c, 1e-5), w, b) * cot)

    np.testing.assert_allclose(linear(x, w, b), ref_linear(x, w, b), atol=1e-5)
    np.testing.assert_allclose(layer_norm(x, scale, bias, 1e-5),
                               ref_layer_norm(x, scale, bias, 1e-5), atol=1e-5)
    args = (x, w, b, scale, bias)
    got = jax.jit(jax.grad(loss(linear, layer_norm), tuple(range(5))))(*args)
    want = jax.grad(loss(ref_linear, ref_layer_norm), tuple(range(5)))(*args)
    assert_trees_close(got, want)
    # bfloat16 compute: LayerNorm statistics stay float32, gradients come back in bf16
    xb = x.astype(jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(layer_norm(x, scale, bias, 1e-5).astype(jnp.float32)))(xb)
    assert g.dtype == jnp.bfloat16


def _plain_kernels(monkeypatch):
    for name in kernels.KERNELS:
        monkeypatch.setattr(kernels, name, getattr(kernels, f"{name}_reference"))


MODEL_CASES = {
    # head, scan_layers; both left-pad one row (fully masked query rows) and right-pad the
    # other. The unpadded, dropout-free LM is covered by the tensor-parallel test below.
    "lm-scan": ("lm", True),
    "sequence-unrolled": ("sequence", False),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_gradients_match_plain_kernels(name, monkeypatch):
    head, scan = MODEL_CASES[name]
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1, head=head,
                     num_labels=3, pad_token_id=0, scale_attn_by_inverse_layer_idx=True,
                     scan_layers=scan)
    graphdef, params = nnx.split(create_model(cfg, 0))
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    out_shape = (2, 8, 64) if head == "lm" else (2, 3)
    cot = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    key = jax.random.key(7)  # dropout on: both sides draw the same keep masks

    def make_loss():  # a fresh function per side: JAX caches traces per function object
        return lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask, dropout_key=key) * cot)

    loss = make_loss()
    assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(params))  # the kernels are in use
    got_loss, got = jax.value_and_grad(loss)(params)
    with monkeypatch.context() as m:
        _plain_kernels(m)
        loss = make_loss()
        assert "custom_vjp_call" not in str(jax.make_jaxpr(loss)(params))
        want_loss, want = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    assert_trees_close(got, want)
    flat = flat_params(got)
    layer0 = "h.attn.c_attn_kernel" if scan else "h.0.attn.c_attn_kernel"
    assert float(jnp.abs(flat[layer0]).max()) > 0  # gradients reach the attention weights


def test_tensor_parallel_train_step_matches_plain_one_device_run(monkeypatch):
    """Custom kernels on a (data 4, tensor 2) mesh vs the plain formulas on one device."""
    graphdef, params = tiny_setup()
    with monkeypatch.context() as m:
        _plain_kernels(m)
        # not the cached run: another module on this worker may have cached the custom one
        batches, ref, ref_losses = reference_run.__wrapped__()
    tx, schedule = make_optimizer(OPTIM, 10, params)
    host = jax.tree.map(np.asarray, params)
    host_opt = jax.tree.map(np.asarray, jax.jit(tx.init)(params))
    setup = (graphdef, host, host_opt, tx, schedule, batches)
    new, losses = sharded_run(setup, make_mesh(4, 1, 2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    flat = flat_params(new)
    assert flat["h.1.attn.c_attn_kernel"].addressable_shards[0].data.size < flat[
        "h.1.attn.c_attn_kernel"].size  # heads really are split over the tensor axis
    for key, value in flat.items():  # AdamW magnifies float noise: test_sharding's bound
        np.testing.assert_allclose(np.asarray(value), ref[key], atol=2e-5, err_msg=key)


# ---------------------------------------------------------------- chunked LM loss


def _head_inputs(b=3, t=10, d=8, v=37, seed=6):
    keys = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(keys[0], (b, t, d))
    w = jax.random.normal(keys[1], (v, d))
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    weights = (jax.random.uniform(keys[3], (b, t)) > 0.3).astype(jnp.float32)
    return h, w, targets, weights


@pytest.mark.parametrize("size", [3, 10])  # 3 does not divide the 10 positions
def test_chunked_nll_matches_full_logits(size):
    from gpt2jax.kernels import chunked_nll, optax_nll

    h, w, targets, weights = _head_inputs()
    assert 0 < float(weights.mean()) < 1  # some tokens masked out

    def full(h, w):
        return jnp.sum(optax_nll(jnp.einsum("btd,vd->btv", h, w), targets) * weights)

    def chunked(h, w):
        return jnp.sum(chunked_nll(h, w, targets, size) * weights)

    np.testing.assert_allclose(chunked_nll(h, w, targets, size),
                               optax_nll(jnp.einsum("btd,vd->btv", h, w), targets), rtol=1e-6)
    got_loss, got = jax.jit(jax.value_and_grad(chunked, (0, 1)))(h, w)
    want_loss, want = jax.value_and_grad(full, (0, 1))(h, w)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    assert_trees_close(got, want)
    # masked tokens get no gradient
    assert float(jnp.abs(got[0][weights == 0]).max()) == 0.0


@pytest.mark.parametrize("size", [3])  # does not divide the 10 positions
def test_fused_nll_sum_matches_full_logits(size):
    """The training loss: gradients made in the forward pass, scaled by the upstream one."""
    from gpt2jax.kernels import fused_nll_sum, optax_nll

    h, w, targets, weights = _head_inputs(seed=7)

    def full(h, w, weights):
        return 2.5 * jnp.sum(optax_nll(jnp.einsum("btd,vd->btv", h, w), targets) * weights)

    def fused(h, w, weights):
        return 2.5 * fused_nll_sum(h, w, targets, weights, size)

    np.testing.assert_allclose(float(fused(h, w, weights)), float(full(h, w, weights)),
                               rtol=1e-6)
    got_loss, got = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(h, w, weights)
    want_loss, want = jax.value_and_grad(full, (0, 1, 2))(h, w, weights)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    assert_trees_close(got, want)  # includes d/dweights = 2.5 * nll
    assert float(jnp.abs(got[0][weights == 0]).max()) == 0.0


def test_train_and_eval_steps_with_loss_chunk_match_full_logits():
    """make_train_step / make_eval_step with model.loss_chunk vs the full-logits path."""
    from test_optim import TINY, lm_batch

    from gpt2jax.train import make_eval_step, make_train_step

    full_cfg = TINY  # vocab 256; 8 rows of 16 positions
    chunk_cfg = TINY.replace(loss_chunk=24)  # 3 positions per chunk: does not divide 16
    gd_full, params = nnx.split(create_model(full_cfg, 0))
    gd_chunk, _ = nnx.split(create_model(chunk_cfg, 0))
    tx, schedule = make_optimizer(OPTIM, 10, params)
    opt = tx.init(params)
    batch = lm_batch(1, 8, 16, seed=3)
    assert 0 < batch["weights"].mean() < 1
    out = {}
    for name, gd in (("full", gd_full), ("chunk", gd_chunk)):
        step = jax.jit(make_train_step(gd, tx, False, 1, jax.random.key(0)))
        new, _, m = step(params, opt, batch, jnp.int32(0))
        ev = jax.jit(make_eval_step(gd, False))(params, jax.tree.map(lambda x: x[0], batch))
        out[name] = (flat_params(new), m, ev)
    (p_full, m_full, ev_full), (p_chunk, m_chunk, ev_chunk) = out["full"], out["chunk"]
    np.testing.assert_allclose(float(m_chunk["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_chunk["grad_norm"]), float(m_full["grad_norm"]),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ev_chunk), np.asarray(ev_full), rtol=1e-6)
    for key, value in p_full.items():  # one AdamW step: test_sharding's bound
        np.testing.assert_allclose(np.asarray(p_chunk[key]), np.asarray(value), atol=2e-5,
                                   err_msg=key)


def test_classification_auxiliary_lm_loss_with_loss_chunk_matches_full_logits():
    """train.lm_loss_weight's LM term over the real tokens of padded rows, chunked."""
    from test_optim import TINY

    from gpt2jax.train import make_train_step

    cfg = TINY.replace(head="sequence", num_labels=3, pad_token_id=0)
    gd_full, params = nnx.split(create_model(cfg, 0))
    gd_chunk, _ = nnx.split(create_model(cfg.replace(loss_chunk=20), 0))  # 5 of 15
    tx, schedule = make_optimizer(OPTIM, 10, params)
    opt = tx.init(params)
    rng = np.random.default_rng(1)
    mask = np.ones((1, 4, 16), np.int32)
    mask[0, 0, :5] = 0  # left padding
    mask[0, 1, 12:] = 0  # right padding
    batch = dict(input_ids=rng.integers(1, 256, (1, 4, 16)).astype(np.int32),
                 attention_mask=mask, labels=rng.integers(0, 3, (1, 4)).astype(np.int32))
    out = []
    for gd in (gd_full, gd_chunk):
        step = jax.jit(make_train_step(gd, tx, True, 1, jax.random.key(0),
                                       lm_loss_weight=0.5))
        out.append(step(params, opt, batch, jnp.int32(0))[2])
    np.testing.assert_allclose(float(out[1]["loss"]), float(out[0]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(out[1]["grad_norm"]), float(out[0]["grad_norm"]),
                               rtol=1e-5)


def test_chunked_loss_never_holds_the_full_logits():
    """Compiled temp memory of loss + gradients: the full path needs the (N, V) float32
    logits (and their gradient); the chunked one only a chunk's."""
    from gpt2jax.kernels import chunked_nll, fused_nll_sum, optax_nll

    b, t, d, v = 4, 64, 32, 4096
    h, w, targets, weights = _head_inputs(b, t, d, v)
    logits_bytes = b * t * v * 4  # 4 MiB

    def full(h, w):
        return jnp.sum(optax_nll(jnp.einsum("btd,vd->btv", h, w), targets) * weights)

    def chunked(h, w):
        return jnp.sum(chunked_nll(h, w, targets, 8) * weights)  # 32-token chunks

    def fused(h, w):
        return fused_nll_sum(h, w, targets, weights, 8)

    def temp(f):
        compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_temp, chunk_temp, fused_temp = temp(full), temp(chunked), temp(fused)
    assert full_temp >= logits_bytes
    # a chunk's logits are 32 x 4096 x 4 = 0.5 MiB; dW's accumulator is 0.5 MiB too
    assert chunk_temp < logits_bytes / 2, (chunk_temp, full_temp)
    assert fused_temp < logits_bytes / 2, (fused_temp, full_temp)


def test_chunk_positions_count_the_rows_each_device_holds():
    """loss_chunk is tokens per device: under a mesh the batch is split over data x fsdp."""
    from gpt2jax.sharding import chunk_positions, make_mesh

    assert chunk_positions(0, (8, 256)) == 0
    assert chunk_positions(256, (8, 256)) == 32  # one device holds all 8 rows
    assert chunk_positions(4096, (8, 256)) == 256  # capped at the sequence length
    with jax.sharding.use_abstract_mesh(make_mesh(4, 2, 1).abstract_mesh):
        assert chunk_positions(256, (16, 256)) == 128  # 2 rows per device
        assert chunk_positions(256, (6, 256)) == 42  # 6 rows do not split 8 ways: whole
