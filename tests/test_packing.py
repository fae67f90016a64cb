"""data.packing=documents: packed documents do not see each other.

A block of three documents of different lengths, cut by both of its edges, against
transformers' GPT2LMHeadModel run on each document piece alone (random weights, built
locally): logits within 1e-5 for the explicit and the xla attention, and the eval step's
summed loss equals transformers' on the pieces with the block's next tokens as targets
(the last token of a document predicts the next document's EOS, which counts). The
custom attention kernel's gradient with segment ids against its plain formula, the
blocks' segment ids against a hand count, and the config errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import save_hf_model
from test_checkpoint import private_data_cache, write_text  # noqa: F401 (autouse fixture)
from test_kernels import _qkv, assert_trees_close

from gpt2jax.batches import LMBlocks, prepare
from gpt2jax.config import load_config
from gpt2jax.data import Tokenized
from gpt2jax.errors import UserError
from gpt2jax.kernels import attention_core, attention_core_reference
from gpt2jax.model import attention_mask_bias

EOS, VOCAB, BLOCK = 95, 96, 25
# stream: EOS d0 EOS d1 EOS d2 EOS d3; block 1 is stream[24:49]: the last 7 tokens of d0
# (cut by the left edge), EOS + d1 (whole), EOS + the first 11 tokens of d2 (cut by the
# right edge; its 12th token is the block's last target); block 2 cuts d2 and d3
LENGTHS = [30, 5, 20, 30]
SEGMENTS_BLOCK_1 = [0] * 7 + [1] * 6 + [2] * 12


def tokenized(lengths: list[int], seed: int = 0) -> Tokenized:
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, EOS, sum(lengths)).astype(np.int32)  # no EOS inside a document
    n = len(lengths)
    return Tokenized(ids=ids, starts=np.cumsum([0, *lengths[:-1]]), lengths=np.array(lengths),
                     nbytes=np.array(lengths), rows=np.arange(n))


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_small")
    return path, save_hf_model(path, tokenizer=False, vocab_size=VOCAB, n_positions=40,
                               n_embd=32, n_layer=2, n_head=2)


def test_blocks_carry_segment_ids_that_change_at_each_document():
    tok = tokenized(LENGTHS)
    packed = LMBlocks(tok, BLOCK, EOS, segments=True).take(np.array([0, 1]))
    plain = LMBlocks(tok, BLOCK, EOS).take(np.array([0, 1]))
    assert "segments" not in plain
    np.testing.assert_array_equal(packed["tokens"], plain["tokens"])
    np.testing.assert_array_equal(packed["weights"], plain["weights"])
    stream = np.concatenate([np.r_[EOS, tok.record(i)] for i in range(len(LENGTHS))])
    np.testing.assert_array_equal(packed["tokens"][1], stream[24:49])
    assert packed["segments"][0].tolist() == [0] * 25  # EOS + the first 24 tokens of d0
    assert packed["segments"][1].tolist() == SEGMENTS_BLOCK_1
    # a split by blocks keeps the segments
    sub = LMBlocks(tok, BLOCK, EOS, segments=True).subset(np.array([1]))
    assert sub.take(np.array([0]))["segments"][0].tolist() == SEGMENTS_BLOCK_1


def piecewise_nll(hf, batch: dict) -> tuple[float, float]:
    """transformers' summed weighted next-token NLL over a batch of packed blocks, each
    segment of each block run as a sequence of its own; targets are the block's next
    tokens. Returns (sum, weight total)."""
    import torch

    total, count = 0.0, 0.0
    for tokens, seg, w in zip(batch["tokens"], batch["segments"], batch["weights"]):
        inputs, targets, segs, tw = tokens[:-1], tokens[1:], seg[:-1], w[1:]
        for s in np.unique(segs):
            sel = segs == s
            with torch.no_grad():
                logits = hf(torch.tensor(inputs[sel][None].astype(np.int64))).logits[0]
            nll = torch.nn.functional.cross_entropy(
                logits, torch.tensor(targets[sel].astype(np.int64)), reduction="none")
            total += float((nll * torch.tensor(tw[sel])).sum())
        count += float(tw.sum())
    return total, count


@pytest.mark.parametrize("attention", ["explicit", "xla"])
def test_each_document_gets_the_logits_transformers_gives_it_alone(hf_small, attention):
    import torch
    from flax import nnx

    from gpt2jax.hf import load_hf_dir
    from gpt2jax.train import make_eval_step

    path, hf = hf_small
    model = load_hf_dir(path, attention=attention)
    batch = LMBlocks(tokenized(LENGTHS), BLOCK, EOS, segments=True).take(np.array([0, 1, 2]))
    inputs, segs = batch["tokens"][:, :-1], batch["segments"][:, :-1]
    logits = np.asarray(nnx.jit(lambda m, x, s: m.lm_logits(m.hidden_states(
        x, segment_ids=s)[0]))(model, inputs, segs))
    concat = np.asarray(nnx.jit(lambda m, x: m(x))(model, inputs))
    pieces = 0
    for row in range(len(inputs)):
        for s in np.unique(segs[row]):
            sel = segs[row] == s
            with torch.no_grad():
                ref = hf(torch.tensor(inputs[row][sel][None].astype(np.int64))).logits[0].numpy()
            np.testing.assert_allclose(logits[row][sel], ref, rtol=0, atol=1e-5)
            if sel[0]:  # the first piece of a row sees nothing before it either way
                np.testing.assert_allclose(concat[row][sel], ref, rtol=0, atol=1e-5)
            else:  # without segment ids a later piece attends to the earlier ones
                assert np.abs(concat[row][sel] - ref).max() > 1e-3
                pieces += 1
    assert pieces == 3  # block 1 holds two later pieces, block 2 one (LENGTHS)
    graphdef, params = nnx.split(model)
    got = np.asarray(jax.jit(make_eval_step(graphdef, False))(params, batch))
    want = piecewise_nll(hf, batch)
    assert got[1] == want[1] == 3 * (BLOCK - 1)
    assert got[0] == pytest.approx(want[0], rel=1e-5)


@pytest.mark.parametrize("dropout", [False, True])
def test_attention_kernel_gradient_with_segment_ids_matches_plain_formula(dropout):
    q, k, v, cot = _qkv(b=2, h=3, t=9)
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2, 2]])
    mask = attention_mask_bias(9, 9, None) & (seg[:, :, None] == seg[:, None, :])[:, None]
    keep, rate = None, 0.0
    if dropout:
        rate = 0.25
        keep = jax.random.bernoulli(jax.random.key(2), 1 - rate, (2, 3, 9, 9))
    scale = jnp.float32(0.4)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, scale, keep, rate) * cot)

    out = attention_core(q, k, v, mask, scale, keep, rate)
    np.testing.assert_allclose(out, attention_core_reference(q, k, v, mask, scale, keep, rate),
                               atol=1e-6)
    # a query's output is a mix of its own segment's values only
    np.testing.assert_allclose(out[0, :, 3:5], attention_core(
        q[:1, :, 3:5], k[:1, :, 3:5], v[:1, :, 3:5], attention_mask_bias(2, 2, None), scale,
        None if keep is None else keep[:1, :, 3:5, 3:5], rate)[0], atol=1e-6)
    got = jax.jit(jax.grad(loss(attention_core), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(attention_core_reference), argnums=(0, 1, 2))(q, k, v)
    assert_trees_close(got, want)
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in got)


def test_train_validation_and_compiled_batches_follow_the_run_packing(tmp_path):
    """prepare's train and validation sources, and `gpt2jax compile`'s abstract batch."""
    from gpt2jax.compile import abstract_batch
    from gpt2jax.model import GPT2Config
    from gpt2jax.sharding import make_mesh
    from gpt2jax.tokenizer import gpt2_tokenizer

    text = write_text(tmp_path / "t.txt", n_docs=20, words=12)
    for packing, has in (("documents", True), ("concat", False)):
        cfg = load_config(None, [f"--data.train={text}", f"--data.packing={packing}",
                                 "--data.validation_fraction=0.2", "--train.seq_len=16"])
        p = prepare(cfg.data, gpt2_tokenizer(), seq_len=16, seed=0, eos=50256)
        for source in (p.train, p.validation):
            assert ("segments" in source.take(np.array([0]))) == has
        batch = abstract_batch(cfg, GPT2Config(n_layer=1, n_embd=16, n_head=2), make_mesh())
        assert ("segments" in batch) == has
        assert batch.get("segments", batch["tokens"]).shape == batch["tokens"].shape


def test_documents_refuse_cudnn_chosen_by_auto_too():
    """model.attention=auto becomes cudnn on a GPU (bf16, no dropout); the refusal runs on
    the resolved choice as well, not only on the config's word."""
    from gpt2jax.config import check_packing_attention
    from gpt2jax.model import GPT2Config, resolve_auto

    cfg = resolve_auto(GPT2Config(dtype="bfloat16", attention="auto", embd_pdrop=0.0,
                                  attn_pdrop=0.0, resid_pdrop=0.0), "cuda")
    assert cfg.attention == "cudnn"  # the premise: auto picks cuDNN here
    with pytest.raises(UserError, match="model.attention=auto resolved to cudnn"):
        check_packing_attention("documents", cfg.attention, resolved=True)
    check_packing_attention("concat", cfg.attention, resolved=True)  # concat is fine


@pytest.mark.parametrize("overrides,message", [
    (["--data.packing=documents", "--model.attention=cudnn", "--model.dtype=bfloat16",
      "--model.dropout=0"],
     "data.packing: documents is not supported with model.attention=cudnn; set "
     "model.attention=explicit or xla"),
    (["--data.packing=docs"], "data.packing: choose one of concat, documents"),
    (["--train.best_metric=accuracy"],
     "train.best_metric: choose one of loss, perplexity for data.task=lm"),
    (["--train.early_stop.patience=-1"], "train.early_stop.patience: must be >= 0"),
    (["--train.early_stop.min_delta=-0.5"], "train.early_stop.min_delta: must be >= 0"),
    (["--train.early_stop.patience=2", "--train.eval_every=0"],
     "train.early_stop.patience: needs evaluations: set train.eval_every > 0"),
])
def test_config_errors(tmp_path, cli, overrides, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train": str(tmp_path / "none.txt")}}))
    res = cli("train", cfg, *overrides)
    assert res.code == 2
    assert res.last_err.startswith("gpt2jax: error: " + message)


def test_early_stop_needs_a_validation_split(tmp_path, cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"train": str(write_text(tmp_path / "t.txt", n_docs=4, words=20)),
                 "validation_fraction": 0.0},
        "train": {"early_stop": {"patience": 2}, "seq_len": 16, "run_dir": str(tmp_path / "run")}}))
    res = cli("train", cfg)
    assert res.code == 2
    assert res.last_err == ("gpt2jax: error: train.early_stop needs a validation split, and the "
                            "data gave none: set data.validation, or data.validation_fraction > 0")
