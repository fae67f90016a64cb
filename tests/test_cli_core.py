"""Bad input through the CLI: exit status 2, one `gpt2jax: error:` line, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest


def _model_dir(tmp_path, hf_lm_dir, case: str):
    """A copy of the tiny LM directory broken in one way."""
    src = hf_lm_dir[0]
    d = tmp_path / case
    d.mkdir()
    config = json.loads((src / "config.json").read_text())
    weights = (src / "model.safetensors").read_bytes()
    if case == "no_config":
        (d / "model.safetensors").write_bytes(weights)
        return d
    if case == "corrupt_weights":
        weights = weights[:8] + b"\x00garbage" + weights[16:200]
    elif case == "shape_mismatch":
        config["n_positions"] = 128
    elif case == "cross_attention":
        config["add_cross_attention"] = True
    elif case == "unknown_activation":
        config["activation_function"] = "swishy"
    elif case == "zero_heads":
        config["n_head"] = 0
    elif case == "fractional_layers":
        config["n_layer"] = 2.5
    (d / "config.json").write_text(json.dumps(config))
    if case != "no_weights":
        (d / "model.safetensors").write_bytes(weights)
    return d


MODEL_CASES = {
    "no_config": r"no_config is neither a transformers directory",
    "no_weights": r"no_weights has config.json but no weights",
    "corrupt_weights": r"corrupt_weights/model.safetensors is not a readable safetensors",
    "shape_mismatch": r"'transformer.wpe.weight' has shape \(64, 32\) but config.json implies "
                      r"\(128, 32\)",
    "cross_attention": r"config.json: add_cross_attention=true .* not supported",
    "unknown_activation": r"activation_function='swishy' is not supported",
    "zero_heads": r"n_head must be positive, got 0",
    "fractional_layers": r"config.json: n_layer=2.5 must be a whole number",
}


def _assert_user_error(r, match: str) -> None:
    import re

    assert r.code == 2, (r.code, r.out, r.err)
    assert r.last_err.startswith("gpt2jax: error:"), r.err
    assert "Traceback" not in r.err
    assert re.search(match, r.last_err), r.last_err


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_directories(cli, hf_lm_dir, tmp_path, case):
    d = _model_dir(tmp_path, hf_lm_dir, case)
    r = cli("score", "--model", d, "--prompt", "a", "--answer", "b")
    _assert_user_error(r, MODEL_CASES[case])


def test_bad_data_and_arguments(cli, hf_lm_dir, hf_cls_dir, tmp_path):
    lm = hf_lm_dir[0]
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello", "label": "pos"}\n')
    cases = [
        (("eval", "--model", lm, "--data", tmp_path / "missing.jsonl"),
         r"missing.jsonl does not exist"),
        (("eval", "--model", lm, "--data", data),
         r"no column 'text'; its columns are: body, label"),
        (("eval", "--model", hf_cls_dir[0], "--data", data, "--text-column", "body",
          "--label-column", "stars"), r"no column 'stars'"),
        (("eval", "--model", lm, "--data", "hub:gpt2jax-test/nothing"), r"hub is offline"),
        (("eval", "--model", lm, "--data", data, "--text-column", "body", "--task",
          "classification"), r"LM head only"),
        (("eval", "--model", lm, "--data", data, "--text-column", "body", "--seq-len", "65"),
         r"--seq-len 65 must be between 2 and the model's n_positions \(64\)"),
        (("eval", "--model", lm, "--data", data, "--text-column", "body", "--stride", "64"),
         r"--stride 64 must be at least 1 and below --seq-len 64"),
        (("eval", "--model", lm, "--data", data, "--batch-size", "0"), r"--batch-size"),
        (("score", "--model", "gpt2jax-test/no-such-model", "--prompt", "a", "--answer", "b"),
         r"not a local directory and the Hugging Face hub is offline"),
        (("score", "--model", lm, "--prompt", "a", "--answer", ""), r"the answer is empty"),
        (("eval", "--model", lm), r"--data"),  # argparse errors follow the same format
    ]
    for argv, match in cases:
        _assert_user_error(cli(*argv), match)


def test_export_refuses_a_non_empty_directory(cli, hf_lm_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("export", "--model", hf_lm_dir[0], "--out", out)
    _assert_user_error(r, r"out exists and is not empty; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    r = cli("export", "--model", hf_lm_dir[0], "--out", out, "--overwrite", "--json")
    assert r.code == 0, r.err
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _assert_user_error(cli("export", "--model", hf_lm_dir[0], "--out", a_file), "--overwrite")
    assert cli("export", "--model", hf_lm_dir[0], "--out", a_file, "--overwrite").code == 0
    assert (a_file / "config.json").is_file()


def test_debug_shows_the_traceback(cli, hf_lm_dir, tmp_path):
    d = _model_dir(tmp_path, hf_lm_dir, "no_weights")
    r = cli("--debug", "score", "--model", d, "--prompt", "a", "--answer", "b")
    assert r.code == 2
    assert "Traceback" in r.err and r.last_err.startswith("gpt2jax: error:")
    shutil.rmtree(d)


def test_no_transformers_torch_advice_without_torch(tmp_path):
    """gpt2jax needs no torch: where it is not installed (simulated by an import blocker),
    a command that loads the tokenizer prints nothing about PyTorch."""
    import os
    import subprocess
    import sys

    (tmp_path / "t.txt").write_text("one two three four five six seven eight nine ten " * 20)
    (tmp_path / "c.yaml").write_text(f"data: {{train: {tmp_path / 't.txt'}, cache_dir: 'off'}}\n")
    code = f"""
import importlib.abc, importlib.util, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoTorch())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a, **k: (
    None if n.split(".")[0] == "torch" else _find(n, *a, **k))
from gpt2jax.cli import main
sys.exit(main(["prepare", "{tmp_path / 'c.yaml'}"]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}  # as users
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PyTorch" not in p.stderr, p.stderr


def test_hints_a_new_user_gets(cli, capsys):
    """Help says what gpt2jax is, shows defaults and the demo's overrides; contradictory
    sampling options and keys from other trainers get a clear line, not silence."""
    from gpt2jax.cli import build_parser

    assert build_parser().description.startswith("Train, fine-tune, evaluate and export")
    helps = {}
    for command in ("demo", "generate"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "--section.key=value overrides the config" in helps["demo"]
    assert "--top-k TOP_K 0: off (default: 0)" in helps["generate"]
    res = cli("generate", "--model", "x", "--prompt", "hi", "--greedy", "--top-k", "5")
    assert res.code == 2 and "greedy decoding always takes the most likely token, so --top-k" in \
        res.last_err
    res = cli("train", "configs/demo.yaml", "--optim.learning_rate=1e-3")
    assert res.code == 2 and "unknown key (did you mean optim.lr?)" in res.last_err
    assert "gpt2jax/config.py" not in res.last_err
