"""Run logs: metrics.jsonl (one JSON object per log step), tensorboardX, loss.png; and
`print_line`, for the lines other programs read from stdout.

Only process 0 writes. On resume, rows past the restored step are dropped first so that
metrics.jsonl reads as one run (TensorBoard gets a purge event for the same steps).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TextIO


class Tracker:
    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._resume_step = resume_step
        if enabled:
            truncate_metrics(self.path, resume_step)

    @property
    def tb(self):
        if self._tb is None and self.enabled:
            from tensorboardX import SummaryWriter

            # purge_step hides events a resumed run repeats (as truncate_metrics does for
            # the jsonl); the pid keeps two writers in one second from sharing a file name.
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                     purge_step=self._resume_step + 1 if self._resume_step
                                     else None, filename_suffix=f".{os.getpid()}")
        return self._tb

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        """Append a row and write scalars as `<split>/<name>`."""
        if not self.enabled:
            return
        row = {"step": step, **({} if split == "train" else {"split": split}),
               **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, int | float) and math.isfinite(v):
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v):
    if v is None:  # JSON null, not the string "None"
        return None
    try:
        return float(v) if not isinstance(v, int | str | list | dict) else v
    except (TypeError, ValueError):
        return str(v)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows with step > `step` (a resumed run repeats them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    path.write_text("".join(x + "\n" for x in keep))


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png: train loss per log step and validation loss per evaluation."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r]
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "validation" and "loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)" if not any("accuracy" in r for r in rows) else "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def print_line(text: str, file: TextIO | None = None) -> None:
    """Print `text` and its newline in one write, then flush.

    Under PYTHONUNBUFFERED (local.sh, the k8s jobs) `print` writes the text and the newline
    separately, and gloo's threads write their "[Gloo] Rank ..." messages to the same stdout
    piece by piece; one write of under PIPE_BUF bytes keeps a machine-read line contiguous.
    """
    out = sys.stdout if file is None else file
    out.write(text + "\n")
    out.flush()
