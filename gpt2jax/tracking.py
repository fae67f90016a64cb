"""Run logs: metrics.jsonl (a JSON object per row), TensorBoard, loss.png; and `print_line`,
for the lines other programs read from stdout. On resume, rows past the restored step are
dropped first (TensorBoard gets a purge event), so the logs read as one run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: where torch is installed,
    tensorboardX imports it (about a second of every run's start-up) only to accept torch
    tensors, and gpt2jax logs plain floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        # `import torch` raises ImportError meanwhile (process-wide: gpt2jax's only other
        # thread then, the batch prefetcher, reads numpy arrays and imports nothing)
        sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class Tracker:
    """A run's metrics.jsonl and TensorBoard events (written only when `enabled`)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.run_dir, self.enabled, self._resume_step = Path(run_dir), enabled, resume_step
        self.path, self._tb = self.run_dir / "metrics.jsonl", None
        if enabled:
            truncate_metrics(self.path, resume_step)

    @property
    def tb(self):
        if self._tb is None and self.enabled:
            SummaryWriter = _summary_writer_class()
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
    """v as JSON: None (null, not "None"), ints, text, lists and dicts as they are, other
    numbers (numpy, jax) as floats, anything else as text."""
    if v is None or isinstance(v, int | str | list | dict):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _lines(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each readable line of a metrics.jsonl (a kill mid-write cuts one)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        with contextlib.suppress(json.JSONDecodeError):
            out.append((line, json.loads(line)))
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows with step > `step` (a resumed run repeats them)."""
    if path.exists():
        keep = [line for line, row in _lines(path) if row.get("step", 0) <= step]
        path.write_text("".join(x + "\n" for x in keep))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] if there is none)."""
    return [row for _, row in _lines(Path(path))]


@contextlib.contextmanager
def figure(path: str | Path, size: tuple[float, float]) -> Iterator:
    """A new figure and its axes (no display needed), saved to `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png: train loss per log step and validation loss per evaluation."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r]
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "validation" and "loss" in r]
    if not train and not val:
        return None
    out = Path(run_dir) / "loss.png"
    with figure(out, (7, 4)) as (_, ax):
        for points, style, label in ((train, "-", "train"), (val, "o-", "validation")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        classifier = any("accuracy" in r for r in rows)
        ax.set(xlabel="step", ylabel="loss" if classifier else "loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    return out


def print_line(text: str, file: TextIO | None = None) -> None:
    """Print `text` and its newline in one write, then flush: under PYTHONUNBUFFERED `print`
    writes them separately, and gloo's threads write "[Gloo] Rank ..." to the same stdout
    piece by piece; one write of under PIPE_BUF bytes keeps a machine-read line whole."""
    out = sys.stdout if file is None else file
    out.write(text + "\n")
    out.flush()
