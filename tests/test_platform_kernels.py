"""model.kernels and model.attention per platform (model.resolve_auto; docs/benchmarks.md,
"Kernels per platform"), and the model-level switch between the custom-VJP kernels and
the plain formulas.

The expected choices below are the table of docs/benchmarks.md written out by hand. The
switch test trains nothing: it compares the loss and every gradient of the same weights
through `model.kernels=custom` (kernels.py's hand-written backward passes, the fused
chunked loss) and `model.kernels=plain` (the formulas differentiated by jax.grad, a
rematerialised scan for the chunked loss), and both against optax's cross-entropy of the
full logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gpt2jax.errors import UserError
from gpt2jax.model import GPT2Config, create_model, resolve_auto

# platform, dtype, dropout -> (kernels, attention, loss_chunk) as docs/benchmarks.md says
CHOICES = {
    ("cpu", "float32", 0.1): ("custom", "explicit", 256),
    ("cpu", "bfloat16", 0.0): ("custom", "explicit", 256),
    ("tpu", "bfloat16", 0.0): ("plain", "xla", 4096),
    ("tpu", "float32", 0.0): ("plain", "xla", 4096),
    ("tpu", "float32", 0.1): ("plain", "explicit", 4096),
    ("cuda", "bfloat16", 0.0): ("plain", "cudnn", 4096),
    ("cuda", "bfloat16", 0.1): ("plain", "explicit", 4096),  # cuDNN has no attention dropout
    ("cuda", "float32", 0.0): ("plain", "explicit", 4096),  # nor a float32 kernel
    ("gpu", "bfloat16", 0.0): ("plain", "explicit", 4096),  # a GPU without cuDNN (ROCm)
}


@pytest.mark.parametrize("case", list(CHOICES), ids=lambda c: "-".join(map(str, c)))
def test_auto_resolves_per_platform(case):
    platform, dtype, drop = case
    cfg = GPT2Config(dtype=dtype, attn_pdrop=drop, attention="auto", kernels="auto")
    got = resolve_auto(cfg, platform)
    assert (got.kernels, got.attention, got.loss_chunk) == CHOICES[case]


def test_explicit_choices_are_kept_and_bad_ones_refused():
    cfg = GPT2Config(dtype="bfloat16", attn_pdrop=0.0, attention="xla", kernels="custom",
                     loss_chunk=0)
    assert resolve_auto(cfg, "cuda") == cfg
    with pytest.raises(UserError, match="model.kernels='fast': choose one of auto, custom"):
        GPT2Config(kernels="fast")


@pytest.fixture(scope="module")
def losses_and_grads():
    """{kernels: (loss, grads)} of one tiny LM (padding, dropout on, chunked loss) through
    the training loss `lm_loss_sum`, plus optax's loss of the full logits."""
    base = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                      attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1, loss_chunk=5)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0, 1, (2, 12)), jnp.float32)
    key = jax.random.key(1)  # the same dropout draws on both sides
    out = {}
    for kernels in ("custom", "plain"):
        graphdef, params = nnx.split(create_model(base.replace(kernels=kernels), 0))

        def loss(p, graphdef=graphdef):
            model = nnx.merge(graphdef, p)
            h, _ = model.hidden_states(ids, dropout_key=key)
            return model.lm_loss_sum(h, targets, weights), model.lm_logits(h)

        jaxpr = str(jax.make_jaxpr(loss)(params))
        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        out[kernels] = (value, grads, jaxpr)
        full = optax.softmax_cross_entropy_with_integer_labels(
            np.asarray(logits, np.float64), np.asarray(targets))
        out[f"optax-{kernels}"] = float(np.sum(np.asarray(full) * np.asarray(weights)))
    return out


def test_plain_kernels_equal_custom_kernels_in_the_model(losses_and_grads):
    (c_loss, c_grad, c_jaxpr), (p_loss, p_grad, p_jaxpr) = (
        losses_and_grads["custom"], losses_and_grads["plain"])
    assert "custom_vjp_call" in c_jaxpr and "custom_vjp_call" not in p_jaxpr
    np.testing.assert_allclose(float(p_loss), float(c_loss), rtol=1e-5)
    for (path, p), c in zip(jax.tree_util.tree_leaves_with_path(p_grad),
                            jax.tree.leaves(c_grad), strict=True):
        p, c = np.asarray(p), np.asarray(c)
        assert np.abs(c).max() > 0, path
        np.testing.assert_allclose(p, c, rtol=0, atol=1e-5 * np.abs(c).max(), err_msg=str(path))


def test_both_kernel_choices_equal_optax_on_the_full_logits(losses_and_grads):
    for kernels in ("custom", "plain"):
        np.testing.assert_allclose(float(losses_and_grads[kernels][0]),
                                   losses_and_grads[f"optax-{kernels}"], rtol=1e-5)
