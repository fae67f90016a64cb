"""model.attention: jax.nn.dot_product_attention ("xla", "cudnn") against the explicit
custom-VJP path, and the errors for what the library call cannot do.

Tolerance: float32 logits and gradients agree to 1e-5 relative to the largest entry (the
two paths differ only in summation order and the masked-logit constant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_kernels import assert_trees_close

from gpt2jax.config import load_config
from gpt2jax.errors import UserError
from gpt2jax.model import GPT2Config, create_model

BASE = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, embd_pdrop=0.0,
            attn_pdrop=0.0, resid_pdrop=0.0, scale_attn_by_inverse_layer_idx=True)


def _ids(seed=3):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32)


# row 0 left-padded (fully masked query rows), row 1 right-padded
PADDED = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)


@pytest.mark.parametrize("scan,mask", [(False, None), (False, "padded"), (True, "padded")])
def test_xla_attention_matches_explicit(scan, mask):
    explicit = GPT2Config(**BASE, scan_layers=scan)
    graphdef, params = nnx.split(create_model(explicit, 0))
    xla_graphdef, _ = nnx.split(create_model(explicit.replace(attention="xla"), 0))
    ids = _ids()
    am = PADDED if mask else None
    cot = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 64)), jnp.float32)
    if mask:  # padding positions carry no loss, as in training
        cot = cot * PADDED[..., None]

    def make_loss(gd):
        return lambda p: jnp.sum(nnx.merge(gd, p)(ids, am) * cot)

    got_loss, got = jax.value_and_grad(make_loss(xla_graphdef))(params)
    want_loss, want = jax.value_and_grad(make_loss(graphdef))(params)
    # the xla side really bypasses attention_core (tied_head is the only custom VJP left)
    assert "attention_core" in str(jax.make_jaxpr(make_loss(graphdef))(params))
    assert "attention_core" not in str(jax.make_jaxpr(make_loss(xla_graphdef))(params))
    logits_x = nnx.merge(xla_graphdef, params)(ids, am)
    logits_e = nnx.merge(graphdef, params)(ids, am)
    real = np.asarray(PADDED if mask else jnp.ones((2, 8)), bool)
    np.testing.assert_allclose(np.asarray(logits_x)[real], np.asarray(logits_e)[real],
                               atol=2e-5)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    assert_trees_close(got, want)
    layer0 = got["h"]["attn"]["c_attn_kernel"] if scan else got["h"][0]["attn"]["c_attn_kernel"]
    assert float(jnp.abs(layer0[...]).max()) > 1e-4  # gradients reach the attention weights


def test_library_attention_refuses_attention_dropout():
    cfg = GPT2Config(**{**BASE, "attn_pdrop": 0.1}, attention="xla")
    model = create_model(cfg, 0)
    ids = _ids()
    assert model(ids).shape == (2, 8, 64)  # evaluation (no dropout key) is fine
    with pytest.raises(UserError, match="no attention dropout.*attn_pdrop=0.1"):
        model(ids, dropout_key=jax.random.key(0))
    # resid/embd dropout alone are fine with the library attention
    cfg = GPT2Config(**{**BASE, "resid_pdrop": 0.1}, attention="xla")
    assert np.isfinite(create_model(cfg, 0)(ids, dropout_key=jax.random.key(0))).all()


def test_attention_config_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="model.attention='flash'"):
        GPT2Config(attention="flash")
    with pytest.raises(UserError, match="cudnn needs a 16-bit compute dtype"):
        GPT2Config(attention="cudnn")
    with pytest.raises(UserError, match="loss_chunk must be -1 .auto."):
        GPT2Config(loss_chunk=-2)
    # auto is fixed by the entry points for a platform (a pure function of its arguments);
    # left open, the model computes full logits
    from gpt2jax.model import resolve_auto
    from gpt2jax.run import for_this_process

    assert resolve_auto(GPT2Config(), "cpu", hugepages=True).loss_chunk == 1024
    assert resolve_auto(GPT2Config(), "cpu").loss_chunk == 256
    assert resolve_auto(GPT2Config(), "tpu").loss_chunk == 4096
    assert resolve_auto(GPT2Config(loss_chunk=0), "cpu").loss_chunk == 0
    assert GPT2Config().loss_chunk_tokens == 0
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # what the process runs with
    assert for_this_process(GPT2Config()).loss_chunk == 1024
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert for_this_process(GPT2Config()).loss_chunk == 256
    base = ["--data.train=x.txt"]
    with pytest.raises(UserError, match=r"model.attention: xla has no attention dropout.*unset"):
        load_config(None, [*base, "--model.attention=xla"])
    with pytest.raises(UserError, match="model.attention: cudnn needs model.dtype=bfloat16"):
        load_config(None, [*base, "--model.attention=cudnn", "--model.dropout=0"])
    cfg = load_config(None, [*base, "--model.attention=xla", "--model.dropout=0",
                             "--model.loss_chunk=512"])
    from gpt2jax.run import model_config

    m = model_config(cfg, None, ())
    assert (m.attention, m.loss_chunk, m.attn_pdrop) == ("xla", 512, 0.0)
    from gpt2jax.hf import config_to_hf

    assert not {"attention", "loss_chunk"} & set(config_to_hf(m))  # not architecture


def test_cudnn_without_nvidia_gpu_is_a_user_error():
    cfg = GPT2Config(**BASE, attention="cudnn", dtype="bfloat16")
    model = create_model(cfg, 0)
    with pytest.raises(UserError, match=r"needs an NVIDIA GPU.*8 device\(s\): cpu"):
        model(_ids())
    # decoding keeps its KV-cache path, which does not use the library call
    h, cache = model.hidden_states(_ids()[:, :1], cache=model.init_cache(2, 4), cache_index=0)
    assert h.shape == (2, 1, 16) and len(cache) == 2


def test_bench_attention_and_loss_chunk_flags(cli):
    res = cli("bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size",
              "300", "--n-positions", "32", "--batch-size", "2", "--seq-len", "16",
              "--steps", "1", "--warmup", "1", "--rounds", "1", "--peak-size", "64",
              "--attention", "xla", "--loss-chunk", "8", "--json")
    assert res.code == 0, res.err
    c = res.json["config"]
    assert (c["attention"], c["loss_chunk"]) == ("xla", 8)
    assert res.json["jax"]["tokens_per_sec"] > 0
    res = cli("bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size",
              "300", "--batch-size", "2", "--seq-len", "16", "--attention", "cudnn",
              "--dtype", "bfloat16", "--steps", "1", "--rounds", "1", "--peak-size", "64")
    assert res.code == 2 and "needs an NVIDIA GPU" in res.last_err
