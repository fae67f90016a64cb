"""scripts/accel-check --dry-run: the accelerator check's whole sequence on the CPU, at
tiny sizes (docs/scaling.md section 7). The steps that need an accelerator print their
commands; training, its loss and throughput, and the attention comparison really run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "accel.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "accel-check"), "--dry-run",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    return r, json.loads(out.read_text()) if out.exists() else None


def test_dry_run_runs_every_step_in_order_and_passes(dry_run):
    r, result = dry_run
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [s["step"] for s in result["steps"]]
    assert steps == ["wheels", "parity", "train", "compile", "bench", "attention"]
    assert all(s["ok"] for s in result["steps"])
    # the table for docs/benchmarks.md, one row per step
    assert r.stdout.count("\n| ") == 1 + len(steps)
    skipped = {s["step"]: s["result"] for s in result["steps"] if "skipped" in s["result"]}
    assert set(skipped) == {"parity", "compile", "bench"}
    assert "tests/test_parity_torch.py" in skipped["parity"]
    assert "bench --vs hf" in skipped["bench"]


def test_dry_run_trains_in_bfloat16_and_compares_attention(dry_run):
    _, result = dry_run
    rows = {s["step"]: s for s in result["steps"]}
    train = rows["train"]["data"]
    assert train["loss_last"] < train["loss_first"] - 0.1  # 30 steps of AdamW at lr 2e-3
    # a freshly initialised model starts near the uniform loss, log(50257) = 10.82
    assert abs(train["loss_first"] - 10.82) < 0.5
    assert train["tokens_per_sec"] > 0 and train["peak_bytes"] > 0
    assert "mfu" not in train  # a CPU has no rated peak in the chip table
    # xla attention is another implementation: bf16-close to explicit, never identical
    assert 0 < rows["attention"]["data"]["xla"] < 5e-2
