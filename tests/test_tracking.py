"""Run logs: metrics.jsonl rows, TensorBoard scalars (read back by hand), resume, loss.png."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from gpt2jax.tracking import Tracker, plot_loss, read_metrics, truncate_metrics


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    from tensorboardX.crc32c import crc32c

    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path) -> list[bytes]:
    """The payloads of a TFRecord file: [uint64 length][uint32 crc][data][uint32 crc]..."""
    buf, out, i = path.read_bytes(), [], 0
    while i < len(buf):
        header = buf[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", buf[i + 8 : i + 12])
        data = buf[i + 12 : i + 12 + length]
        (data_crc,) = struct.unpack("<I", buf[i + 12 + length : i + 16 + length])
        assert header_crc == _masked_crc(header)
        assert len(data) == length and data_crc == _masked_crc(data)
        out.append(data)
        i += 16 + length
    return out


def tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under run_dir/tensorboard."""
    from tensorboardX.proto.event_pb2 import Event

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        records = _records(f)
        first = Event.FromString(records[0])
        assert first.file_version.startswith("brain.Event:")
        for rec in records[1:]:
            event = Event.FromString(rec)
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_log_writes_rows_and_scalars(tmp_path):
    t = Tracker(tmp_path)
    t.log(10, {"loss": np.float32(2.5), "lr": 1e-3, "tokens": 4096})
    t.log(20, {"loss": 2.25, "lr": 5e-4, "tokens": 8192})
    t.log(20, {"loss": 2.0, "perplexity": math.exp(2.0)}, split="validation")
    t.close()
    rows = _rows(tmp_path)
    assert rows == [
        {"step": 10, "loss": 2.5, "lr": 1e-3, "tokens": 4096},
        {"step": 20, "loss": 2.25, "lr": 5e-4, "tokens": 8192},
        {"step": 20, "split": "validation", "loss": 2.0, "perplexity": math.exp(2.0)},
    ]
    assert type(rows[0]["loss"]) is float and type(rows[0]["tokens"]) is int
    sc = tb_scalars(tmp_path)
    assert set(sc) == {"train/loss", "train/lr", "train/tokens", "validation/loss",
                       "validation/perplexity"}
    assert sc["train/loss"] == [(10, 2.5), (20, 2.25)]
    assert [s for s, _ in sc["train/lr"]] == [10, 20]
    np.testing.assert_allclose([v for _, v in sc["train/lr"]], [1e-3, 5e-4], rtol=1e-6)
    assert sc["train/tokens"] == [(10, 4096.0), (20, 8192.0)]
    assert sc["validation/loss"] == [(20, 2.0)]
    ((step, ppl),) = sc["validation/perplexity"]
    assert step == 20 and ppl == pytest.approx(math.exp(2.0), rel=1e-6)  # float32 in the event


def test_jax_and_numpy_scalars_become_plain_numbers(tmp_path):
    import jax.numpy as jnp

    t = Tracker(tmp_path)
    t.log(1, {"loss": jnp.asarray(1.5), "grad_norm": np.float64(0.25), "note": "warmup",
              "shape": np.zeros(2), "best": None})
    t.close()
    (row,) = _rows(tmp_path)
    assert row == {"step": 1, "loss": 1.5, "grad_norm": 0.25, "note": "warmup",
                   "shape": "[0. 0.]", "best": None}  # null, not the string "None"
    assert set(tb_scalars(tmp_path)) == {"train/loss", "train/grad_norm"}  # strings are not


def test_non_finite_values_stay_out_of_tensorboard(tmp_path):
    t = Tracker(tmp_path)
    t.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    t.log(2, {"loss": 3.0, "grad_norm": 1.0, "lr": 0.1})
    t.close()
    rows = _rows(tmp_path)
    assert math.isnan(rows[0]["loss"]) and rows[0]["grad_norm"] == math.inf  # jsonl keeps them
    sc = tb_scalars(tmp_path)
    assert sc["train/loss"] == [(2, 3.0)]
    assert sc["train/grad_norm"] == [(2, 1.0)]
    assert [s for s, _ in sc["train/lr"]] == [1, 2]


def test_disabled_tracker_writes_nothing(tmp_path):
    old = '{"step": 1, "loss": 3.0}\n{"step": 9, "loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text(old)
    t = Tracker(tmp_path, enabled=False, resume_step=1)  # not process 0
    t.log(2, {"loss": 1.0})
    t.log(2, {"loss": 1.0}, split="validation")
    t.text("samples", "hello", 2)
    assert t.tb is None
    t.close()
    assert (tmp_path / "metrics.jsonl").read_text() == old  # not even truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_text_goes_to_tensorboard(tmp_path):
    from tensorboardX.proto.event_pb2 import Event

    t = Tracker(tmp_path)
    t.text("samples", "once upon a time", 3)
    t.log(4, {"loss": 1.0})
    t.close()
    t.close()  # twice is fine
    texts = []
    for f in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        for rec in _records(f)[1:]:
            ev = Event.FromString(rec)
            texts += [(ev.step, v.tag, v.tensor.string_val) for v in ev.summary.value
                      if v.tensor.string_val]
    assert texts == [(3, "samples/text_summary", [b"once upon a time"])]
    assert tb_scalars(tmp_path) == {"train/loss": [(4, 1.0)]}


def test_resume_drops_rows_past_the_step_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 10, "loss": 3.0}\n'
        '{"step": 20, "loss": 2.5}\n'
        '{"step": 20, "split": "validation", "loss": 2.6}\n'
        '{"step": 30, "loss": 2.0}\n'
        '{"step": 40, "lo'  # the process was killed mid-write
    )
    t = Tracker(tmp_path, resume_step=20)
    assert [(r["step"], r.get("split")) for r in read_metrics(path)] == [
        (10, None), (20, None), (20, "validation")]
    t.log(30, {"loss": 1.9})
    t.close()
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path)] == [
        (10, 3.0), (20, 2.5), (20, 2.6), (30, 1.9)]
    # TensorBoard: a START session log at step 21 tells readers to drop the old 21+ events
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    starts = [e.step for e in map(Event.FromString, _records(events))
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts == [21]


def test_truncate_metrics_edges(tmp_path):
    path = tmp_path / "metrics.jsonl"
    truncate_metrics(path, 5)
    assert not path.exists()  # nothing to truncate: no file is created
    path.write_text('{"step": 0, "loss": 1}\n\n{"loss": 2}\n{"step": 6}\n{"step": 5}')
    truncate_metrics(path, 5)
    # a row without a step counts as step 0; the blank line goes; a newline is restored
    assert path.read_text() == '{"step": 0, "loss": 1}\n{"loss": 2}\n{"step": 5}\n'
    truncate_metrics(path, -1)
    assert path.read_text() == ""


def test_read_metrics(tmp_path):
    assert read_metrics(tmp_path / "none.jsonl") == []
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\nnot json\n{"step": 2, "split": "validation"}\n{"st')
    rows = read_metrics(path)
    assert len(rows) == 2 and math.isnan(rows[0]["loss"])
    assert rows[1] == {"step": 2, "split": "validation"}
    assert read_metrics(str(path)) == rows  # a str path works too


def test_plot_loss_writes_a_png(tmp_path):
    t = Tracker(tmp_path)
    for step in (1, 2, 3, 4):
        t.log(step, {"loss": 4.0 / step})
    t.log(4, {"loss": 1.2}, split="validation")
    t.close()
    out = plot_loss(tmp_path)
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR: figsize (7, 4) at 100 dpi
    assert (width, height) == (700, 400)


def test_plot_loss_validation_only_and_no_rows(tmp_path):
    assert plot_loss(tmp_path) is None  # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert plot_loss(tmp_path) is None  # rows, but no loss
    assert not (tmp_path / "loss.png").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "split": "validation", "loss": 2.0}\n')
    assert plot_loss(str(tmp_path)).read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_logging_does_not_import_torch(tmp_path):
    # tensorboardX imports torch whenever it is installed (it is here: the test extra),
    # about a second of every training run's start-up; the tracker keeps it out and
    # torch still imports normally afterwards
    import subprocess
    import sys

    code = ("import sys; from gpt2jax.tracking import Tracker; t = Tracker(sys.argv[1]); "
            "t.log(1, {'loss': 2.5}); t.close(); print('torch' in sys.modules); "
            "import torch; print(torch.tensor([1.0]).sum().item())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "1.0"]
    assert tb_scalars(tmp_path)["train/loss"] == [(1, 2.5)]
