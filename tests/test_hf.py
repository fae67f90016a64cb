"""Hugging Face interop: export loads cleanly in transformers, import reads every layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_model import _pad, _torch_logits, forward, random_model

from gpt2jax.errors import UserError


@pytest.fixture(scope="module")
def lm_model(hf_lm_dir):
    from gpt2jax.hf import load_hf_dir

    return load_hf_dir(hf_lm_dir[0])


@pytest.fixture(scope="module")
def lm_flat(lm_model):
    from gpt2jax.hf import to_flat_params

    return to_flat_params(lm_model)


def _assert_clean_load(info: dict) -> None:
    """transformers warns about exactly these lists; all must be empty."""
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])


def test_export_lm_loads_in_transformers(lm_model, hf_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2jax.hf import export_hf
    from gpt2jax.tokenizer import gpt2_tokenizer

    out = export_hf(lm_model, tmp_path / "out", gpt2_tokenizer())
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    torch_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    _assert_clean_load(info)
    ids = np.random.RandomState(0).randint(0, 50000, (2, 10))
    exported = _torch_logits(torch_model.eval(), ids)
    assert np.abs(exported - forward(lm_model, ids)).max() <= 1e-4
    assert np.abs(exported - _torch_logits(hf_lm_dir[1], ids)).max() <= 1e-5
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [15496, 995]


def test_export_classifier_loads_in_transformers(hf_cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from gpt2jax.hf import export_hf, load_hf_dir
    from gpt2jax.tokenizer import load_tokenizer

    model = load_hf_dir(hf_cls_dir[0])
    out = export_hf(model, tmp_path / "out", load_tokenizer(hf_cls_dir[0]))
    torch_model, info = AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    _assert_clean_load(info)
    assert torch_model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert torch_model.config.pad_token_id == 50256
    rng = np.random.RandomState(1)
    ids, mask = _pad([list(rng.randint(0, 50000, n)) for n in (4, 8)], "right")
    exported = _torch_logits(torch_model.eval(), ids, mask)
    assert np.abs(exported - forward(model, ids, mask)).max() <= 1e-4
    assert np.abs(exported - _torch_logits(hf_cls_dir[1], ids, mask)).max() <= 1e-5


@pytest.mark.parametrize(
    "cfg_kw",
    [dict(scan_layers=True), dict(head="sequence", num_labels=3, labels=("a", "b", "c"))],
    ids=["lm_scan_layers", "sequence"],
)
def test_import_of_export_is_bit_exact(tmp_path, cfg_kw):
    from gpt2jax.hf import export_hf, load_hf_dir, to_flat_params
    from gpt2jax.model import GPT2Config

    cfg = GPT2Config(vocab_size=96, n_positions=24, n_embd=24, n_head=3, n_layer=2,
                     n_inner=40, **cfg_kw)
    model = random_model(cfg, seed=3)
    back = load_hf_dir(export_hf(model, tmp_path / "out"), scan_layers=cfg.scan_layers)
    arch = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "head",
            "num_labels")
    assert [getattr(back.cfg, k) for k in arch] == [getattr(cfg, k) for k in arch]
    assert back.cfg.labels == cfg.labels
    ours, theirs = to_flat_params(model), to_flat_params(back)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert np.array_equal(ours[k], theirs[k]), k


def _variant_dir(variant: str, hf_lm_dir, tmp_path):
    """The tiny LM written in another layout that transformers also accepts."""
    from safetensors.numpy import load_file, save_file

    src, torch_model = hf_lm_dir
    d = tmp_path / variant
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    n_layer, n_pos = torch_model.config.n_layer, torch_model.config.n_positions
    meta = {"format": "pt"}
    if variant == "no_prefix":  # hub-style names, as the original gpt2 checkpoint has
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    elif variant == "legacy_buffers":
        for i in range(n_layer):
            tril = np.tril(np.ones((n_pos, n_pos), np.float32))[None, None]
            tensors[f"transformer.h.{i}.attn.bias"] = tril
            tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    elif variant == "lm_head":
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    elif variant == "untied_lm_head":
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    elif variant == "numpy_no_metadata":
        meta = None
    if variant == "sharded":
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for fname, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(d / fname), metadata=meta)
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    elif variant == "pytorch_bin":
        import torch

        torch.save(torch_model.state_dict(), d / "pytorch_model.bin")
    else:
        save_file(tensors, str(d / "model.safetensors"), metadata=meta)
    return d


@pytest.mark.parametrize(
    "variant",
    ["no_prefix", "legacy_buffers", "lm_head", "sharded", "numpy_no_metadata", "pytorch_bin"],
)
def test_import_variants_give_the_same_weights(variant, hf_lm_dir, lm_flat, tmp_path):
    from gpt2jax.hf import load_hf_dir, to_flat_params

    flat = to_flat_params(load_hf_dir(_variant_dir(variant, hf_lm_dir, tmp_path)))
    assert flat.keys() == lm_flat.keys()
    for k in flat:
        assert np.array_equal(flat[k], lm_flat[k]), k


def test_untied_lm_head_is_refused(hf_lm_dir, tmp_path):
    from gpt2jax.hf import load_hf_dir

    with pytest.raises(UserError, match="untied"):
        load_hf_dir(_variant_dir("untied_lm_head", hf_lm_dir, tmp_path))


def test_attention_pool_export_needs_backbone_only(tmp_path):
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from gpt2jax.hf import export_hf
    from gpt2jax.model import GPT2Config

    cfg = GPT2Config(vocab_size=96, n_positions=24, n_embd=24, n_head=3, n_layer=2,
                     head="attention_pool", num_labels=4)
    model = random_model(cfg, seed=4, std=0.05)
    with pytest.raises(UserError, match="backbone-only"):
        export_hf(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = export_hf(model, tmp_path / "backbone", backbone_only=True)
    assert (out / "attention_pool_head.safetensors").is_file()
    torch_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    _assert_clean_load(info)
    ids = np.random.RandomState(5).randint(0, 96, (2, 9))
    ours = nnx.jit(lambda m, x: m.lm_logits(m.hidden_states(x)[0]))(model, ids)
    assert np.abs(_torch_logits(torch_model.eval(), ids) - np.asarray(ours)).max() <= 1e-4


@pytest.mark.parametrize("head", ["lm", "sequence", "attention_pool"])
def test_export_reads_long_text_in_transformers_and_has_the_usual_permissions(tmp_path, head):
    """transformers' tokenizer with truncation=True cuts at the exported model's context
    (not GPT-2's 1024), so the model runs on a 1,000-word text; every export path (LM,
    classifier, backbone-only) gives files and folders the umask's usual modes."""
    import os
    import stat

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from gpt2jax.hf import export_hf
    from gpt2jax.model import GPT2Config
    from gpt2jax.tokenizer import gpt2_tokenizer

    cfg = GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, head=head, num_labels=2,
                     pad_token_id=50256 if head == "sequence" else None)
    old = os.umask(0o022)
    try:
        out = export_hf(random_model(cfg, seed=1), tmp_path / head, gpt2_tokenizer(),
                        backbone_only=head == "attention_pool")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(" ".join(["word"] * 1000), truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape == (1, 32)
    auto = AutoModelForSequenceClassification if head == "sequence" else AutoModelForCausalLM
    with torch.no_grad():
        logits = auto.from_pretrained(out)(**enc).logits
    assert torch.isfinite(logits).all()
