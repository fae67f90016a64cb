"""The attention-pooling head against a plain numpy implementation.

The head has no transformers class, so the reference is written out here from its
description: per head a learned query scores projected keys of the final hidden states
(scaled by 1/sqrt(head_dim), padding masked out), the softmax-weighted values of all heads
are concatenated and a linear layer gives the class logits. Forward and gradient (against
central differences in float64) are checked, and the backbone-only export: transformers'
GPT2Model on the exported backbone plus this numpy head on the exported head file must
give the model's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_model import _pad, forward, random_model

HEAD = ("query", "key_kernel", "key_bias", "value_kernel", "value_bias", "out_kernel",
        "out_bias")


def numpy_pool(h: np.ndarray, mask: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Class logits (B, labels) from hidden states (B, T, D) and a {name: array} head."""
    h = np.asarray(h, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    n_head, head_dim = p["query"].shape
    keys = np.einsum("btd,dhk->bthk", h, p["key_kernel"]) + p["key_bias"]
    vals = np.einsum("btd,dhk->bthk", h, p["value_kernel"]) + p["value_bias"]
    scores = np.einsum("bthk,hk->bht", keys, p["query"]) / np.sqrt(head_dim)
    scores = np.where(np.asarray(mask, bool)[:, None, :], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    pooled = np.einsum("bht,bthk->bhk", w, vals).reshape(len(h), n_head * head_dim)
    return pooled @ p["out_kernel"] + p["out_bias"]


def numpy_loss(h, mask, p, labels) -> float:
    """Mean cross-entropy of numpy_pool's logits."""
    z = numpy_pool(h, mask, p)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


@pytest.fixture(scope="module")
def pool_model():
    from gpt2jax.model import GPT2Config

    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=24, n_head=3, n_layer=2,
                     head="attention_pool", num_labels=4, classifier_dropout=0.0)
    return random_model(cfg, seed=7, std=0.3)


def head_params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(model.pool, k)[...]) for k in HEAD}


def test_attention_pool_forward_and_gradient_equal_numpy(pool_model):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 7, 24)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 3 + [0] * 2], np.int32)
    labels = np.array([0, 3, 2])
    p = head_params(pool_model)
    ours = np.asarray(pool_model.pool(jnp.asarray(h), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, numpy_pool(h, mask, p), rtol=1e-5, atol=1e-5)
    h_padded = h.copy()
    h_padded[mask == 0] = 1e3  # hidden states under padding have no effect
    np.testing.assert_allclose(numpy_pool(h_padded, mask, p), numpy_pool(h, mask, p))

    graphdef, state = nnx.split(pool_model.pool)

    def loss(state, hidden):
        logits = nnx.merge(graphdef, state)(hidden, jnp.asarray(mask))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g_state, grad_h = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(h))
    grads = {".".join(map(str, path)): np.asarray(v.get_value())
             for path, v in nnx.to_flat_state(g_state)}
    eps = 1e-6
    for name in HEAD:
        want = np.zeros(p[name].shape)
        for idx in np.ndindex(p[name].shape):
            q = {k: v.astype(np.float64) for k, v in p.items()}
            q[name][idx] += eps
            up = numpy_loss(h, mask, q, labels)
            q[name][idx] -= 2 * eps
            want[idx] = (up - numpy_loss(h, mask, q, labels)) / (2 * eps)
        np.testing.assert_allclose(grads[name], want, rtol=1e-3, atol=2e-6,
                                   err_msg=name)
        if name == "key_bias":  # adds the same score to every position: softmax ignores it
            assert np.abs(grads[name]).max() < 1e-6
        else:
            assert np.abs(want).max() > 1e-4, name  # the check is not vacuous
    want_h = np.zeros(h.shape)
    for idx in np.ndindex(h.shape):
        hp = h.astype(np.float64)
        hp[idx] += eps
        up = numpy_loss(hp, mask, p, labels)
        hp[idx] -= 2 * eps
        want_h[idx] = (up - numpy_loss(hp, mask, p, labels)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad_h), want_h, rtol=1e-3, atol=2e-6)
    assert not np.asarray(grad_h)[mask == 0].any()  # padding gets no gradient


def hf_backbone_hidden(export_dir, ids, mask) -> np.ndarray:
    """transformers' GPT2Model (the exported backbone) final hidden states, float64."""
    import torch
    from transformers import GPT2Model

    backbone = GPT2Model.from_pretrained(str(export_dir)).eval()
    position_ids = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))  # left padding too
    with torch.no_grad():
        out = backbone(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=position_ids)
    return out.last_hidden_state.double().numpy()


def test_backbone_only_export_holds_the_head_and_reproduces_the_logits(pool_model, tmp_path):
    from safetensors.numpy import load_file

    from gpt2jax.hf import export_hf

    out = export_hf(pool_model, tmp_path / "backbone", backbone_only=True)
    stored = load_file(str(out / "attention_pool_head.safetensors"))
    want = head_params(pool_model)
    assert stored.keys() == {f"pool.{k}" for k in HEAD}
    for k in HEAD:
        assert stored[f"pool.{k}"].dtype == np.float32
        np.testing.assert_array_equal(stored[f"pool.{k}"], want[k])
    ids, mask = _pad([list(range(5, 14)), list(range(40, 44)), [7]], "left", pad_id=0)
    logits = numpy_pool(hf_backbone_hidden(out, ids, mask), mask,
                        {k: stored[f"pool.{k}"] for k in HEAD})
    np.testing.assert_allclose(forward(pool_model, ids, mask), logits, rtol=1e-4, atol=1e-4)
    assert np.abs(logits).max() > 0.1  # a real signal, not all zeros
