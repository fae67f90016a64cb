"""The Flax model against transformers' PyTorch GPT-2: LM logits, classification heads."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import save_hf_model

# Configs that exercise every config.json field the model maps (small vocab: fast).
CONFIGS = {
    "odd_heads": dict(vocab_size=96, n_head=3, n_embd=24, n_layer=2, n_positions=40),
    "inner_gelu_inverse_layer_scale": dict(
        vocab_size=96, n_head=2, n_embd=16, n_layer=3, n_positions=48, n_inner=40,
        activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
    ),
    "unscaled_relu_eps_upcast": dict(
        vocab_size=96, n_head=4, n_embd=32, n_layer=1, n_positions=24,
        scale_attn_weights=False, activation_function="relu", layer_norm_epsilon=1e-3,
        reorder_and_upcast_attn=True,  # float32 attention either way: same numbers
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm_case(request, tmp_path_factory):
    """(HF directory, torch model, random ids) for one config."""
    path = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(path, tokenizer=False, **CONFIGS[request.param])
    ids = np.random.RandomState(0).randint(0, 96, (2, 19))
    return path, model, ids


@functools.cache
def _jitted_call():
    from flax import nnx

    return nnx.jit(lambda m, ids, mask, key: m(ids, mask, dropout_key=key))


def forward(model, ids, mask=None, dropout_key=None):
    """The model's output as numpy, jitted (one compile per shape beats eager op-by-op)."""
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_jitted_call()(model, ids, mask, dropout_key))


def _torch_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_lm_logits_equal_transformers(lm_case, scan):
    from gpt2jax.hf import load_hf_dir

    path, torch_model, ids = lm_case
    ours = forward(load_hf_dir(path, scan_layers=scan), ids)
    ref = _torch_logits(torch_model, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def test_lm_right_padded_batch_matches_transformers(hf_lm_dir):
    from gpt2jax.hf import load_hf_dir

    path, torch_model = hf_lm_dir
    ids = np.random.RandomState(1).randint(0, 50000, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ours = forward(load_hf_dir(path), ids, mask)
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4


def test_bfloat16_compute_close_to_float32(hf_lm_dir):
    from gpt2jax.hf import load_hf_dir

    path, torch_model = hf_lm_dir
    ids = np.random.RandomState(2).randint(0, 50000, (2, 16))
    model = load_hf_dir(path, dtype="bfloat16")
    ours = forward(model, ids)
    ref = _torch_logits(torch_model, ids)
    assert ours.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.abs(ours - ref).max() <= 2e-2 * np.abs(ref).max()
    assert np.abs(ours - ref).max() > 1e-7  # really computed in bfloat16
    # the next-token ranking is what matters: the top choices barely move
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.8


# ---------------------------------------------------------------- classification heads


def _rows(seed: int, lengths: list[int], eos_last: int | None = None) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    rows = [list(rng.randint(0, 50000, n)) for n in lengths]
    if eos_last is not None:
        rows[eos_last][-1] = 50256  # a real trailing <|endoftext|>
    return rows


def _pad(rows, side: str, pad_id: int = 50256):
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def cls_model(hf_cls_dir):
    from gpt2jax.hf import load_hf_dir

    return load_hf_dir(hf_cls_dir[0])


def test_sequence_head_equals_transformers_right_padded(cls_model, hf_cls_dir):
    rows = _rows(3, [5, 9, 3])
    ids, mask = _pad(rows, "right")
    ours = forward(cls_model, ids, mask)
    ref = _torch_logits(hf_cls_dir[1], ids, mask)
    assert ours.shape == (3, 3)
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded_even_with_trailing_eos(cls_model, hf_cls_dir, side):
    """Pooling follows the mask, so a real trailing eos (pad == eos) is used, not skipped."""
    import torch

    rows = _rows(4, [6, 3], eos_last=0)
    ids, mask = _pad(rows, side)
    batched = forward(cls_model, ids, mask)
    torch_model = hf_cls_dir[1]
    for i, row in enumerate(rows):
        alone = forward(cls_model, [row])[0]
        assert np.abs(batched[i] - alone).max() <= 1e-5
        # transformers on the unpadded row with pooling at the real last token
        torch_model.config.pad_token_id = None
        try:
            with torch.no_grad():
                ref = torch_model(torch.tensor([row])).logits.numpy()[0]
        finally:
            torch_model.config.pad_token_id = 50256
        assert np.abs(alone - ref).max() <= 1e-4


def random_model(cfg, seed: int = 0, std: float = 0.2):
    """A model with N(0, std) weights drawn by numpy: no eager per-shape compiles."""
    from flax import nnx

    from gpt2jax.model import abstract_model, from_values

    rng = np.random.RandomState(seed)
    unstacked = abstract_model(cfg.replace(scan_layers=False))  # per-layer names
    flat = {
        ".".join(map(str, path)): rng.normal(0, std, var.get_value().shape).astype(np.float32)
        for path, var in nnx.to_flat_state(nnx.state(unstacked, nnx.Param))
    }
    return from_values(cfg, flat)


def test_attention_pool_head_masks_padding():
    from gpt2jax.model import GPT2Config

    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=24, n_head=3, n_layer=2,
                     head="attention_pool", num_labels=4)
    model = random_model(cfg)
    rows = [list(range(5, 12)), list(range(20, 24))]
    out = {}
    for side in ("left", "right"):
        ids, mask = _pad(rows, side, pad_id=0)
        out[side] = forward(model, ids, mask)
        other = np.where(mask == 1, ids, 95)  # different pad ids: no effect when masked
        assert np.array_equal(forward(model, other, mask), out[side])
    assert out["left"].shape == (2, 4)
    for i, row in enumerate(rows):
        alone = forward(model, [row])[0]
        assert np.abs(out["left"][i] - alone).max() <= 1e-5
        assert np.abs(out["right"][i] - alone).max() <= 1e-5
    # without the mask the padding leaks in: the comparisons above could fail
    ids, _ = _pad(rows, "right", pad_id=0)
    assert np.abs(forward(model, ids)[1] - out["right"][1]).max() > 1e-4
