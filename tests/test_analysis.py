"""Weight drift (diff) and definition similarity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_hf_model

from gpt2jax.analysis import (
    HiddenStateEmbedder,
    layer_of,
    prompt_from_template,
    row_cosines,
    similarity,
    tensor_diff,
    text_cosines,
    weight_diff,
)
from gpt2jax.errors import UserError


@pytest.fixture(scope="module")
def models(hf_lm_dir, tmp_path_factory):
    """(path_a, model_a, path_b, model_b, tokenizer): two tiny LMs with different weights."""
    from gpt2jax.run import load_model

    path_b = tmp_path_factory.mktemp("lm_b")
    save_hf_model(path_b, seed=5)
    model_a, tok, _ = load_model(str(hf_lm_dir[0]))
    model_b, _, _ = load_model(str(path_b))
    return hf_lm_dir[0], model_a, path_b, model_b, tok


def _direct(a: np.ndarray, b: np.ndarray) -> dict:
    """The statistics computed the obvious way, row by row."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = b - a
    ra, rb = (a.reshape(1, -1), b.reshape(1, -1)) if a.ndim == 1 else (a, b)
    cos = [x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(ra, rb, strict=True)]
    return {
        "mean_abs_diff": np.mean(np.abs(d)),
        "max_abs_diff": np.max(np.abs(d)),
        "std_diff": np.std(d),
        "mean_row_cosine": np.mean(cos),
        "mean_row_l2": np.mean([np.linalg.norm(y - x) for x, y in zip(ra, rb, strict=True)]),
        "relative_l2": np.linalg.norm(d) / np.linalg.norm(a),
    }


def test_diff_statistics_equal_a_direct_numpy_computation(models):
    from gpt2jax.hf import to_hf_tensors

    _, model_a, _, model_b, _ = models
    ta, tb = to_hf_tensors(model_a), to_hf_tensors(model_b)
    diff = weight_diff(model_a, model_b)
    assert set(diff["tensors"]) == set(ta) and "lm_head.weight" not in diff["tensors"]
    for name in ("transformer.h.1.attn.c_attn.weight", "transformer.wte.weight",
                 "transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.weight"):
        want = _direct(ta[name], tb[name])
        for k, v in want.items():
            assert diff["tensors"][name][k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, k)
    # a layer pools its tensors: the statistics of all its elements and all its rows
    names = [n for n in ta if n.startswith("transformer.h.1.")]
    flat = {k: np.concatenate([ta[n].ravel() if k == "a" else tb[n].ravel() for n in names])
            for k in ("a", "b")}
    layer = diff["layers"]["h.1"]
    want = _direct(flat["a"], flat["b"])
    for k in ("mean_abs_diff", "max_abs_diff", "std_diff", "relative_l2"):
        assert layer[k] == pytest.approx(want[k], rel=1e-9)
    rows_a = [r for n in names for r in (ta[n][None] if ta[n].ndim == 1 else ta[n])]
    rows_b = [r for n in names for r in (tb[n][None] if tb[n].ndim == 1 else tb[n])]
    assert layer["mean_row_l2"] == pytest.approx(
        np.mean([np.linalg.norm(y.astype(np.float64) - x) for x, y in zip(rows_a, rows_b,
                                                                        strict=True)]), rel=1e-9)
    assert list(diff["layers"]) == ["embeddings", "h.0", "h.1", "ln_f"]
    assert diff["only_in_a"] == diff["only_in_b"] == [] and diff["shape_mismatch"] == {}


def test_cli_diff_equals_numpy_on_the_torch_state_dicts(models, cli):
    """`gpt2jax diff --json` on two transformers directories against numpy on the two
    state dicts transformers loads (float64 sums)."""
    from transformers import GPT2LMHeadModel

    path_a, _, path_b, _, _ = models
    sd = [{k: v.double().numpy() for k, v in
           GPT2LMHeadModel.from_pretrained(str(p)).state_dict().items()} for p in (path_a, path_b)]
    r = cli("diff", "--a", path_a, "--b", path_b, "--json")
    assert r.code == 0, r.err
    tensors = r.json["tensors"]
    assert set(tensors) == set(sd[0]) - {"lm_head.weight"}  # the tied head is wte
    for name, st in tensors.items():
        a, b = sd[0][name], sd[1][name]
        ra, rb = (a[None], b[None]) if a.ndim == 1 else (a, b)
        d = b - a
        want = {"mean_abs_diff": np.abs(d).mean(), "max_abs_diff": np.abs(d).max(),
                "std_diff": d.std(), "mean_row_l2": np.linalg.norm(rb - ra, axis=1).mean(),
                "n_params": d.size}
        if np.linalg.norm(a) > 0:
            want["relative_l2"] = np.linalg.norm(d) / np.linalg.norm(a)
        else:  # transformers initialises biases to zero: nothing to be relative to
            assert st["relative_l2"] is None
        nz = (np.linalg.norm(ra, axis=1) > 0) & (np.linalg.norm(rb, axis=1) > 0)
        if nz.all():  # rows of zeros (fresh biases) have a convention; see row_cosines
            want["mean_row_cosine"] = cosines(ra, rb).mean()
        for k, v in want.items():
            assert st[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, k)
    assert tensors["transformer.h.0.mlp.c_fc.weight"]["relative_l2"] > 0.5  # really compared
    h1 = [n for n in sd[0] if n.startswith("transformer.h.1.")]
    flat = [np.concatenate([s[n].ravel() for n in h1]) for s in sd]
    layer = r.json["layers"]["h.1"]
    assert layer["max_abs_diff"] == pytest.approx(np.abs(flat[1] - flat[0]).max(), rel=1e-6)
    assert layer["relative_l2"] == pytest.approx(
        np.linalg.norm(flat[1] - flat[0]) / np.linalg.norm(flat[0]), rel=1e-6)


def test_diff_with_itself_is_zero(models):
    model_a = models[1]
    diff = weight_diff(model_a, model_a)
    assert diff["tensors"] and diff["layers"]  # a non-empty result, or the loop proves nothing
    for st in [*diff["tensors"].values(), *diff["layers"].values()]:
        assert st["mean_abs_diff"] == st["max_abs_diff"] == st["std_diff"] == 0.0
        assert st["mean_row_l2"] == 0.0
        assert st["mean_row_cosine"] == pytest.approx(1.0, abs=1e-12)  # zero bias rows too


def test_diff_lists_tensors_in_one_model_and_shape_mismatches(models, hf_cls_dir):
    from gpt2jax.hf import to_hf_tensors
    from gpt2jax.run import load_model

    model_a = models[1]
    cls, _, _ = load_model(str(hf_cls_dir[0]))
    diff = weight_diff(model_a, cls)
    assert diff["only_in_b"] == ["score.weight"] and diff["only_in_a"] == []
    assert "score" not in diff["layers"]
    tb = to_hf_tensors(model_a)
    tb = {k: v for k, v in tb.items() if ".h.1." not in k}  # one layer fewer
    tb["transformer.wpe.weight"] = tb["transformer.wpe.weight"][:32]  # shorter context
    diff = weight_diff(model_a, tb)
    assert diff["only_in_a"] == sorted(n for n in to_hf_tensors(model_a) if ".h.1." in n)
    assert diff["shape_mismatch"] == {"transformer.wpe.weight": {"a": [64, 32], "b": [32, 32]}}
    assert "transformer.wpe.weight" not in diff["tensors"]


def test_row_cosines_and_layer_names():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0], [-2.0, -2.0]])
    np.testing.assert_allclose(row_cosines(a, b), [0.0, 1.0, 0.0, -1.0])
    assert tensor_diff(np.ones(3), np.ones(3) * 2)["mean_row_cosine"] == pytest.approx(1.0)
    assert layer_of("transformer.h.11.mlp.c_fc.bias") == "h.11"
    assert layer_of("transformer.wpe.weight") == "embeddings"
    assert layer_of("score.weight") == "score"


def test_cli_diff_json_table_and_plot(models, cli, tmp_path):
    path_a, _, path_b, _, _ = models
    png = tmp_path / "drift.png"
    r = cli("diff", "--a", path_a, "--b", path_b, "--json", "--plot", png)
    assert r.code == 0, r.err
    out = r.json
    assert {"tensors", "layers", "only_in_a", "only_in_b"} <= set(out)
    assert set(out["tensors"]["transformer.h.0.attn.c_attn.weight"]) >= {
        "mean_abs_diff", "max_abs_diff", "std_diff", "mean_row_cosine", "mean_row_l2"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("diff", "--a", path_a, "--b", path_b)
    assert r.code == 0 and "h.1" in r.out and "mean_row_cosine" in r.out
    r = cli("diff", "--a", path_a, "--b", tmp_path / "missing")
    assert r.code == 2 and r.last_err.startswith("gpt2jax: error:")


def hf_embed(torch_model, tok, texts) -> np.ndarray:
    """The reference embedding, one text at a time (no padding to mask): the mean over
    the text's tokens of transformers' GPT2Model last hidden state (after ln_f); the zero
    vector for an empty text."""
    import torch

    out = np.zeros((len(texts), torch_model.config.n_embd))
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids:
            with torch.no_grad():
                h = torch_model.transformer(torch.tensor([ids])).last_hidden_state[0]
            out[i] = h.double().mean(0).numpy()
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where(na * nb > 0, (a * b).sum(1) / np.maximum(na * nb, 1e-300), 0.0)


def test_hidden_state_embeddings_equal_transformers_masked_mean(models, hf_lm_dir):
    """Batched, padded, bucketed embeddings against transformers one text at a time."""
    _, model_a, _, _, tok = models
    texts = ["a small domesticated carnivore", "to move swiftly", "",
             "the colour of the clear sky on a summer afternoon, far from the city"]
    got = HiddenStateEmbedder(model_a, tok, batch_size=3)(texts)
    want = hf_embed(hf_lm_dir[1], tok, texts)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)  # float32 vs torch float32
    assert np.abs(want[[0, 1, 3]]).min(axis=1).max() > 0 and not want[2].any()
    cos = text_cosines(HiddenStateEmbedder(model_a, tok), texts[:2], texts[2:])
    np.testing.assert_allclose(cos, cosines(want[:2], want[2:]), atol=1e-5)


def test_similarity_equals_transformers_generation_and_embeddings(models, hf_lm_dir):
    """similarity() against an independent pipeline: transformers' greedy generate from
    "word:", cut at the first newline, embedded with GPT2Model's masked mean."""
    import torch

    _, model_a, _, _, tok = models
    torch_model = hf_lm_dir[1]
    records = [{"word": "cat", "definition": "a small feline"},
               {"word": "run", "definition": "to move fast on foot"},
               {"word": "blue", "definition": "the colour of the sky"}]
    r = similarity(model_a, tok, records, max_new_tokens=10)
    generated = []
    for rec in records:
        ids = torch.tensor([tok(f"{rec['word']}:", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = torch_model.generate(ids, max_new_tokens=10, do_sample=False,
                                       eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.eos_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
        generated.append(tok.decode(new).split("\n")[0].strip())
    assert [e["generated"] for e in r["examples"]] == generated and all(generated)
    refs = [rec["definition"] for rec in records]
    want = cosines(hf_embed(torch_model, tok, generated), hf_embed(torch_model, tok, refs))
    np.testing.assert_allclose([e["cosine"] for e in r["examples"]], want, atol=1e-5)
    assert r["mean_cosine_similarity"] == pytest.approx(want.mean(), abs=1e-5)
    assert r["mean_cosine_distance"] == pytest.approx(1.0 - want.mean(), abs=1e-5)
    assert [e["word"] for e in r["examples"]] == ["cat", "run", "blue"]
    with pytest.raises(UserError, match="no column 'definition'"):
        similarity(model_a, tok, [{"word": "x", "gloss": "y"}])


def test_prompt_template():
    assert prompt_from_template("{word}: {definition}", "cat") == "cat:"
    assert prompt_from_template("{word}:", "cat") == "cat:"
    assert prompt_from_template("Define {word}.\n{definition}", "run") == "Define run."
    with pytest.raises(UserError):
        prompt_from_template("{definition}", "cat")
    with pytest.raises(UserError):
        prompt_from_template("{word} {other}", "cat")


def test_cli_similarity(models, cli, tmp_path):
    path_a = models[0]
    data = tmp_path / "held_out.jsonl"
    rows = [{"word": "cat", "definition": "a small feline"},
            {"word": "run", "definition": "to move fast on foot"},
            {"word": "sky", "definition": "the air above the earth"},
            {"word": "tree", "definition": "a tall plant"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("similarity", "--model", path_a, "--data", data, "--limit", "3",
            "--max-new-tokens", "10", "--json")
    assert r.code == 0, r.err
    assert r.json["n"] == 3 and len(r.json["examples"]) == 3
    assert set(r.json["examples"][0]) == {"word", "reference", "generated", "cosine",
                                          "degenerate"}
    r = cli("similarity", "--model", path_a, "--data", data, "--word-column", "lemma")
    assert r.code == 2 and "lemma" in r.last_err and r.last_err.startswith("gpt2jax: error:")
    r = cli("similarity", "--model", path_a, "--data", data, "--embed-model", "st:/nonexistent")
    assert r.code == 2 and r.last_err.startswith("gpt2jax: error:")


def test_similarity_reads_gcide_samples_and_counts_degenerate_generations(cli, hf_lm_dir):
    """`similarity --data gcide` like eval; the sampling options generate has; a count of
    looping generations, each checked here by hand."""
    from gpt2jax.analysis import is_degenerate

    assert is_degenerate("of the genus of the genus") and is_degenerate("a b c x a b c")
    assert not is_degenerate("a small rock found in rivers") and not is_degenerate("a a")
    args = ("similarity", "--model", hf_lm_dir[0], "--data", "gcide:Q", "--limit", "3",
            "--max-new-tokens", "12", "--json")
    greedy = cli(*args)
    assert greedy.code == 0, greedy.err
    rows = greedy.json["examples"]
    assert len(rows) == 3 and greedy.json["degenerate"] == sum(
        is_degenerate(r["generated"]) for r in rows)
    sampled = cli(*args, "--sample", "--top-k", "50", "--temperature", "1.5", "--seed", "1")
    assert sampled.code == 0, sampled.err
    assert [r["generated"] for r in sampled.json["examples"]] != [r["generated"] for r in rows]
    res = cli(*args, "--top-k", "5")  # greedy is the default here: top-k would do nothing
    assert res.code == 2 and "greedy decoding always takes the most likely token" in res.last_err
