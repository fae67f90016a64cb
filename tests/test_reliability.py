"""Faults that must not lose work, and files that must never be executed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2jax"


def _cfg(d: Path, **train) -> Path:
    cfg = {
        "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "dropout": 0.0},
        "data": {"train": str(d / "text.txt"), "task": "lm", "validation_fraction": 0.0},
        # An absurd learning rate without clipping drives the loss to inf/NaN in a few steps.
        "optim": {"lr": 1.0e12, "clip_norm": 0.0, "schedule": "constant", "weight_decay": 0.0},
        "train": {"steps": 6, "batch_size": 8, "seq_len": 16, "run_dir": str(d / "run"),
                  "log_every": 1, "eval_every": 0, "checkpoint_every": 1, "progress": "none",
                  **train},
    }
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def nan_run(tmp_path):
    (tmp_path / "text.txt").write_text("a b c d e f g h i j k l m n o p\n" * 60)
    return tmp_path


def test_nonfinite_loss_stops_naming_the_step_and_keeps_good_checkpoints(nan_run):
    res = run_cli("train", _cfg(nan_run))
    assert res.code == 2, res.err[-2000:]
    m = re.search(r"non-finite loss .* at step (\d+)", res.last_err)
    assert m, res.last_err
    bad_step = int(m.group(1))
    from gpt2jax.checkpoint import Checkpoints
    from gpt2jax.run import load_run

    ckpts = Checkpoints(nan_run / "run", read_only=True)
    steps = ckpts.steps()
    ckpts.close()
    assert steps and max(steps) < bad_step
    model, _, _ = load_run(nan_run / "run")
    from gpt2jax.hf import to_flat_params

    assert all(np.isfinite(v).all() for v in to_flat_params(model).values())


def test_skip_nonfinite_allows_bad_steps_and_leaves_the_weights_bit_identical(nan_run):
    """A checkpoint every step: a skipped step's weights are exactly the previous step's;
    an applied step's are not (so the comparison can fail)."""
    from gpt2jax.hf import to_flat_params
    from gpt2jax.run import load_model

    res = run_cli("train", _cfg(nan_run, skip_nonfinite=100, keep_checkpoints=6))
    assert res.code == 0, res.err[-2000:]
    skipped = {int(x) for x in re.findall(r"skipped step (\d+)", res.err)}
    assert skipped and min(skipped) > 1  # some applied steps, then skipped ones

    def weights(step: int) -> dict:
        model, _, _ = load_model(str(nan_run / "run" / "checkpoints" / str(step)))
        return to_flat_params(model)

    before = weights(1)
    for step in range(2, 7):
        now = weights(step)
        same = all(np.array_equal(now[k], before[k], equal_nan=True) for k in now)
        assert same == (step in skipped), step
        before = now


def test_logged_lr_is_the_rate_of_the_last_applied_update(nan_run):
    """Skipped steps leave the optimizer's count (and so its schedule) where it was."""
    from gpt2jax.optim import make_schedule
    from gpt2jax.tracking import read_metrics

    path = _cfg(nan_run, skip_nonfinite=100)
    cfg = yaml.safe_load(path.read_text())
    cfg["optim"].update(schedule="linear", warmup_steps=3)
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("train", path)
    assert res.code == 0, res.err[-2000:]
    skipped = {int(x) for x in re.findall(r"skipped step (\d+)", res.err)}
    assert skipped and min(skipped) > 1  # some updates applied, then some skipped
    schedule = make_schedule(1.0e12, "linear", 3, 6)
    applied = 0
    rows = [r for r in read_metrics(nan_run / "run" / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        applied += r["step"] not in skipped
        assert r["lr"] == pytest.approx(float(schedule(max(applied - 1, 0))), rel=1e-6)
    assert rows[-1]["lr"] != pytest.approx(float(schedule(5)), rel=1e-3)


def test_failed_export_leaves_no_partial_directory(tmp_path, hf_lm_dir):
    from gpt2jax.hf import export_hf, load_hf_dir

    model = load_hf_dir(hf_lm_dir[0])

    class BrokenTokenizer:
        pad_token = "x"

        def save_pretrained(self, path):
            (Path(path) / "vocab.json").write_text("{")  # a partial write, then a failure
            raise OSError("disk full")

    out = tmp_path / "export"
    with pytest.raises(OSError):
        export_hf(model, out, BrokenTokenizer())
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def _source_lines():
    for path in sorted(PACKAGE.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            yield path.name, n, line


def test_no_unpickling_or_remote_code():
    """Static guard: weights come from safetensors; torch.load only with weights_only=True;
    never pickle, never trust_remote_code."""
    offenders = []
    for name, n, line in _source_lines():
        code = line.split("#", 1)[0]
        if re.search(r"\bpickle\.loads?\(|\bdill\.", code):
            offenders.append((name, n, line))
        if "trust_remote_code=True" in code:
            offenders.append((name, n, line))
        if "torch.load(" in code and "weights_only=True" not in code:
            offenders.append((name, n, line))
    assert not offenders, offenders


def test_checkpoint_names_stay_inside_the_run_dir(tmp_path):
    """Everything the trainer writes sits under train.run_dir (no config value becomes a
    path component outside it)."""
    (tmp_path / "text.txt").write_text("hello world, this is a tiny corpus.\n" * 80)
    cfg = _cfg(tmp_path, steps=2)
    data = yaml.safe_load(cfg.read_text())
    data["optim"] = {"lr": 1e-3}
    cfg.write_text(yaml.safe_dump(data))
    before = {p for p in tmp_path.iterdir()}
    res = run_cli("train", cfg)
    assert res.code == 0, res.err[-2000:]
    after = {p for p in tmp_path.iterdir()}
    assert after - before == {tmp_path / "run"}
    written = json.loads((tmp_path / "run" / "model.json").read_text())
    assert written["n_layer"] == 1
