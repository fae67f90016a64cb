"""Bad input never ends in a traceback: exit status 2 and one `gpt2jax: error:` line.

Every case runs in-process through `main(argv)`. The expected fragment checks that the
message names the problem (what and where), not just that something failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

TINY_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "dropout": 0.0}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, hf_lm_dir):
    """A workspace of good and bad files shared by the cases."""
    d = tmp_path_factory.mktemp("errors")
    (d / "good.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 5)
    rows = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    (d / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = [{"text": f"row {i}", "label": "pos"} for i in range(10)]
    (d / "oneclass.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one))
    (d / "nolabel.jsonl").write_text("".join(json.dumps({"text": "x"}) + "\n" for _ in range(5)))
    (d / "bad.yaml").write_text("model: {n_layer: 2\ntrain: [")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "a_file").write_text("not a directory")
    nonempty = d / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    (d / "hf_nocfg").mkdir()
    return d, hf_lm_dir[0]


def _config(d: Path, **sections) -> Path:
    import yaml

    cfg = {
        "model": dict(TINY_MODEL),
        "data": {"train": str(d / "good.txt"), "task": "lm"},
        "train": {"steps": 1, "batch_size": 8, "seq_len": 16, "run_dir": str(d / "run"),
                  "progress": "none"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = d / f"cfg_{abs(hash(json.dumps(cfg, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _broken_hf(d: Path, src: Path, kind: str) -> Path:
    """A copy of a good transformers directory with one defect."""
    import shutil

    out = d / f"hf_{kind}"
    if out.exists():
        return out
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    if kind == "noweights":
        (out / "model.safetensors").unlink()
    elif kind == "corrupt":
        (out / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif kind == "shapes":
        cfg["n_embd"] = 48
        (out / "config.json").write_text(json.dumps(cfg))
    elif kind == "crossattn":
        cfg["add_cross_attention"] = True
        (out / "config.json").write_text(json.dumps(cfg))
    elif kind == "badjson":
        (out / "config.json").write_text("{not json")
    return out


# (id, argv builder, fragment expected in the error line)
CASES = [
    # ---- config
    ("config-missing", lambda d, m: ["train", d / "nope.yaml"], "does not exist"),
    ("config-yaml-syntax", lambda d, m: ["train", d / "bad.yaml"], "not valid YAML"),
    ("config-not-mapping", lambda d, m: ["train", d / "list.yaml"], "mapping"),
    ("config-unknown-key", lambda d, m: ["train", _config(d), "--train.stepz=3"], "stepz"),
    ("config-wrong-type", lambda d, m: ["train", _config(d), "--train.steps=many"], "steps"),
    ("config-lr-zero", lambda d, m: ["train", _config(d), "--optim.lr=0"], "optim.lr"),
    ("config-steps-negative", lambda d, m: ["train", _config(d), "--train.steps=-1"],
     "train.steps"),
    ("config-seq-len-too-long", lambda d, m: ["train", _config(d), "--train.seq_len=128"],
     "seq_len"),
    ("config-accum-divisible", lambda d, m: ["train", _config(d), "--train.grad_accum=3"],
     "grad_accum"),
    ("config-batch-vs-mesh", lambda d, m: ["train", _config(d), "--train.batch_size=4",
                                           "--mesh.data=8"], "divisible"),
    ("config-mesh-product", lambda d, m: ["train", _config(d), "--mesh.data=3"], "mesh"),
    ("config-bad-override", lambda d, m: ["train", _config(d), "--train.steps"], "override"),
    ("config-head-task", lambda d, m: ["train", _config(d), "--model.head=sequence"],
     "model.head"),
    # ---- data
    ("data-missing", lambda d, m: ["train", _config(d, data={"train": str(d / "nope.txt")})],
     "nope.txt"),
    ("data-empty", lambda d, m: ["train", _config(d, data={"train": str(d / "empty.txt")})],
     "empty.txt"),
    ("data-undecodable", lambda d, m: ["train", _config(d, data={"train": str(d / "latin1.txt")})],
     "latin1.txt"),
    ("data-missing-column", lambda d, m: ["train", _config(
        d, model={"head": "sequence"}, data={"train": str(d / "cls.jsonl"),
                                             "task": "classification", "text_column": "body"})],
     "body"),
    ("data-label-outside-set", lambda d, m: ["train", _config(
        d, model={"head": "sequence"}, data={"train": str(d / "cls.jsonl"),
                                             "task": "classification", "labels": ["neg", "neu"]})],
     "pos"),
    ("data-one-class", lambda d, m: ["train", _config(
        d, model={"head": "sequence"}, data={"train": str(d / "oneclass.jsonl"),
                                             "task": "classification"})], "label"),
    ("data-no-label-column", lambda d, m: ["train", _config(
        d, model={"head": "sequence"}, data={"train": str(d / "nolabel.jsonl"),
                                             "task": "classification"})], "label"),
    ("eval-data-missing", lambda d, m: ["eval", "--model", m, "--data", d / "nope.jsonl"],
     "nope.jsonl"),
    # ---- model sources
    ("src-missing-dir", lambda d, m: ["eval", "--model", d / "nowhere", "--data",
                                      d / "good.txt"], "nowhere"),
    ("src-missing-config", lambda d, m: ["export", "--model", "hf:" + str(d / "hf_nocfg"),
                                         "--out", d / "o1"], "config.json"),
    ("src-missing-weights", lambda d, m: ["export", "--model", _broken_hf(d, m, "noweights"),
                                          "--out", d / "o2"], "weights"),
    ("src-corrupt-safetensors", lambda d, m: ["export", "--model", _broken_hf(d, m, "corrupt"),
                                              "--out", d / "o3"], "safetensors"),
    ("src-shape-mismatch", lambda d, m: ["export", "--model", _broken_hf(d, m, "shapes"),
                                         "--out", d / "o4"], "shape"),
    ("src-unsupported-flag", lambda d, m: ["export", "--model", _broken_hf(d, m, "crossattn"),
                                           "--out", d / "o5"], "add_cross_attention"),
    ("src-bad-json", lambda d, m: ["export", "--model", _broken_hf(d, m, "badjson"),
                                   "--out", d / "o6"], "JSON"),
    ("src-hub-offline", lambda d, m: ["export", "--model", "gpt2-nonexistent-xyz", "--out",
                                      d / "o7"], "offline"),
    ("init-hub-offline", lambda d, m: ["train", _config(d, model={"init": "hf:gpt2"})],
     "offline"),
    # ---- outputs
    ("run-dir-unwritable", lambda d, m: ["train", _config(
        d, train={"run_dir": str(d / "a_file" / "run")})], "run_dir"),
    ("export-nonempty", lambda d, m: ["export", "--model", m, "--out", d / "nonempty"],
     "--overwrite"),
    # ---- generation and scoring
    # checked before the model loads: the missing model is never reached
    ("generate-empty-prompt", lambda d, m: ["generate", "--model", d / "nowhere", "--prompt",
                                            "", "--greedy"], "--prompt is empty"),
    ("generate-zero-tokens", lambda d, m: ["generate", "--model", d / "nowhere", "--prompt",
                                           "hi", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1"),
    ("generate-too-long", lambda d, m: ["generate", "--model", m, "--prompt", "hi",
                                        "--max-new-tokens", "1000"], "max"),
    ("generate-top-p", lambda d, m: ["generate", "--model", m, "--prompt", "hi",
                                     "--top-p", "1.5"], "top"),
    ("generate-top-p-zero", lambda d, m: ["generate", "--model", m, "--prompt", "hi",
                                          "--top-p", "0"], "top"),
    ("score-empty-answer", lambda d, m: ["score", "--model", m, "--prompt", "a",
                                         "--answer", ""], "answer"),
    # ---- the command line itself
    ("cli-unknown-command", lambda d, m: ["frobnicate"], "frobnicate"),
    ("cli-unknown-flag", lambda d, m: ["eval", "--model", m, "--data", d / "good.txt",
                                       "--bogus"], "bogus"),
    ("cli-bad-step", lambda d, m: ["export", "--model", m, "--step", "soon", "--out",
                                   d / "o8"], "step"),
]


@pytest.mark.parametrize("argv_fn, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_error_line(ws, argv_fn, fragment):
    d, model_dir = ws
    res = run_cli(*argv_fn(d, model_dir))
    assert res.code == 2, (res.code, res.err[-2000:])
    assert res.last_err.startswith("gpt2jax: error:"), res.err[-2000:]
    assert "Traceback" not in res.err, res.err[-3000:]
    assert fragment.lower() in res.last_err.lower(), res.last_err


def test_case_count_meets_the_bar():
    assert len(CASES) >= 25


def test_debug_shows_the_traceback(ws):
    d, _ = ws
    res = run_cli("--debug", "train", str(d / "nope.yaml"))
    assert res.code == 2
    assert "Traceback" in res.err
    assert res.last_err.startswith("gpt2jax: error:")


def test_nothing_saved_is_lost_on_a_refused_export(ws):
    d, model_dir = ws
    res = run_cli("export", "--model", str(model_dir), "--out", str(d / "nonempty"))
    assert res.code == 2
    assert (d / "nonempty" / "x").read_text() == "x"
