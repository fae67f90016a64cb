"""Checkpoints and exact resume: one run interrupted every way, against an uninterrupted one.

The interrupted run goes through GPT2JAX_FAULT=kill@step, kill@save, a real kill -9 and a
SIGTERM, each followed by the same command, and must end bit-identical to the reference
run (parameters and every logged loss). The subprocesses use one CPU device and share a
persistent compilation cache that the reference run fills first, so the later processes
only read it (a process killed mid-write never leaves a half-written cache entry).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.params import flat as flat_params
from gpt2jax.run import load_run
from gpt2jax.tracking import read_metrics

STEPS = 16
CONFIG = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "dropout": 0.1},
    "data": {"task": "lm"},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
    "train": {"steps": STEPS, "batch_size": 8, "seq_len": 16, "log_every": 1, "eval_every": 4,
              "eval_batches": 2, "checkpoint_every": 2, "keep_checkpoints": 3,
              "progress": "lines", "seed": 3},
}
WORDS = ("river stone light window garden morning quiet paper harbor engine winter "
         "lantern meadow silver thunder orchard velvet canyon ember").split()


def write_text(path: Path, n_docs: int = 12, words: int = 90, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, words)) + "." for _ in range(n_docs)]
    path.write_text("\n\n".join(docs))
    return path


def write_config(path: Path, run_dir: Path, data: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["train"] = str(data)
    cfg["train"]["run_dir"] = str(run_dir)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


class Trainer:
    """`python -m gpt2jax train CONFIG` in a subprocess with one CPU device."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        self.env.pop("GPT2JAX_FAULT", None)
        self.env["GPT2JAX_CACHE"] = str(tmp / "data-cache")  # not the user's ~/.cache
        self.n = 0

    def start(self, config: Path, *args: str, fault: str | None = None):
        """(Popen, stderr file) of a training process."""
        self.n += 1
        err = self.tmp / f"stderr-{self.n}.txt"
        env = {**self.env, **({"GPT2JAX_FAULT": fault} if fault else {})}
        with err.open("w") as stderr:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpt2jax", "train", str(config), *args],
                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        return proc, err

    def run(self, config: Path, *args: str, fault: str | None = None):
        """(exit status, stdout, stderr) of a training process run to its end."""
        proc, err = self.start(config, *args, fault=fault)
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out, err.read_text()


def wait_for_training(proc, err: Path, timeout: float = 240) -> int:
    """Block until the process logs a step after the one it resumed from; returns it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = err.read_text()
        resumed = re.search(r"resuming .* from step (\d+)", text)
        start = int(resumed.group(1)) if resumed else 0
        done = [int(s) for s in re.findall(r"^step (\d+)/", text, re.M)]
        if any(s > start for s in done):
            return max(done)
        assert proc.poll() is None, f"training ended early ({proc.returncode}):\n{text}"
        time.sleep(0.005)
    raise AssertionError(f"no training step within {timeout} s:\n{err.read_text()}")


def resumed_from(stderr: str) -> int:
    m = re.search(r"resuming .* from step (\d+)", stderr)
    assert m, stderr
    return int(m.group(1))


@pytest.fixture(scope="module", autouse=True)
def private_data_cache(tmp_path_factory):
    """Keep the tokenized-data cache of in-process runs out of the user's ~/.cache
    (imported by the other training test modules)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2JAX_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run and the run interrupted in every way, both finished."""
    tmp = tmp_path_factory.mktemp("resume")
    data = write_text(tmp / "text.txt")
    trainer = Trainer(tmp)
    ref_cfg = write_config(tmp / "ref.yaml", tmp / "ref", data)
    cfg = write_config(tmp / "cfg.yaml", tmp / "run", data)
    run = tmp / "run"
    log: dict = {"tmp": tmp, "ref": tmp / "ref", "run": run, "cfg": cfg, "data": data}

    # The reference run first: it fills the compilation cache (run side by side with the
    # next one, both compiling, took longer on 2 busy cores than one after the other).
    code, _, err = trainer.run(ref_cfg)
    assert code == 0, err

    # 1. killed right after step 5; saves are asynchronous, but checkpoint 2 is committed
    #    (Orbax finishes a save before it starts the next, here 4)
    code, _, err = trainer.run(cfg, fault="kill@step:5")
    assert code == -signal.SIGKILL, err
    log["after_kill_step"] = Checkpoints(run, read_only=True).steps()

    # 2. resumed, then killed right after checkpoint 8 was started (6 is then committed)
    code, _, err = trainer.run(cfg, fault="kill@save:8")
    assert code == -signal.SIGKILL, err
    log["kill_save_resumed_from"] = resumed_from(err)
    log["after_kill_save"] = Checkpoints(run, read_only=True).steps()

    # 3. a real kill -9 in the middle of training
    proc, errf = trainer.start(cfg)
    log["kill9_at_step"] = wait_for_training(proc, errf)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    log["kill9_resumed_from"] = resumed_from(errf.read_text())

    # 4. SIGTERM (preemption): saves, says where, exits 143. The process signals itself
    #    after a known step: sent from here, a stalled test could miss the short run's end.
    log["term_at"] = term_at = Checkpoints(run, read_only=True).steps()[-1] + 1
    proc, errf = trainer.start(cfg, fault=f"term@step:{term_at}")
    proc.wait(timeout=300)
    log["sigterm_code"], log["sigterm_err"] = proc.returncode, errf.read_text()
    m = re.search(r"preempted: saved checkpoint at step (\d+) to (\S+)", log["sigterm_err"])
    if m:  # read it back now: later runs rotate old checkpoints away
        log["sigterm_step"], log["sigterm_path"] = int(m.group(1)), Path(m.group(2))
        log["sigterm_path_is_dir"] = log["sigterm_path"].is_dir()
        log["sigterm_params"] = _params(run, log["sigterm_step"])

    # 5. the same command once more finishes the run
    code, out, err = trainer.run(cfg, "--json")
    assert code == 0, err
    log["final_summary"], log["final_err"] = json.loads(out), err
    return log


def _params(run: Path, step=None) -> dict:
    model, _, _ = load_run(run, step)
    from flax import nnx

    return {k: np.asarray(v) for k, v in flat_params(nnx.state(model, nnx.Param)).items()}


def test_interrupted_run_ends_bit_identical(runs):
    ref, got = _params(runs["ref"]), _params(runs["run"])
    assert ref.keys() == got.keys()
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name
    assert runs["final_summary"]["final_step"] == STEPS
    earlier = _params(runs["ref"], STEPS - 4)  # the oldest kept checkpoint differs
    assert not np.array_equal(earlier["h.0.mlp.c_fc_kernel"], ref["h.0.mlp.c_fc_kernel"])


def test_metrics_read_as_one_run_with_identical_losses(runs):
    # rows with split "data" describe the data each (re)start prepared; compare the rest
    ref = [r for r in read_metrics(runs["ref"] / "metrics.jsonl") if r.get("split") != "data"]
    got = [r for r in read_metrics(runs["run"] / "metrics.jsonl") if r.get("split") != "data"]
    train_steps = [r["step"] for r in got if "split" not in r]
    assert train_steps == list(range(1, STEPS + 1))  # no duplicate rows after 4 resumes
    val_steps = [r["step"] for r in got if r.get("split") == "validation"]
    assert val_steps == list(range(4, STEPS + 1, 4))
    for a, b in zip(ref, got, strict=True):
        assert (a["step"], a.get("split")) == (b["step"], b.get("split"))
        assert a["loss"] == b["loss"], a["step"]  # bit-identical floats
        if "grad_norm" in a:
            assert a["grad_norm"] == b["grad_norm"]


def test_fault_hooks_leave_the_previous_checkpoint(runs):
    after_step = runs["after_kill_step"]
    assert 2 in after_step and after_step[-1] in (2, 4), after_step
    assert runs["kill_save_resumed_from"] == after_step[-1]
    # killed while checkpoint 8 was being written: 6 is intact and the run resumes
    after_save = runs["after_kill_save"]
    assert 6 in after_save and after_save[-1] in (6, 8), after_save
    assert runs["kill9_resumed_from"] == after_save[-1]
    assert runs["kill9_at_step"] > runs["kill9_resumed_from"]


def test_sigterm_saves_says_where_and_exits_143(runs):
    assert runs["sigterm_code"] == 143, runs["sigterm_err"]
    assert "sigterm_step" in runs, runs["sigterm_err"]
    step, path = runs["sigterm_step"], runs["sigterm_path"]
    assert runs["sigterm_path_is_dir"] and path.name == str(step)
    assert path.parent == runs["run"].absolute() / "checkpoints"
    assert step == runs["term_at"] <= STEPS  # the step after the one it resumed from
    assert resumed_from(runs["final_err"]) == step
    params = runs["sigterm_params"]  # the preemption checkpoint restores
    assert params["wte"].shape == (50257, 32)


def test_resume_refuses_changed_model_dimensions(runs, cli):
    before = (runs["run"] / "config.yaml").read_text()
    res = cli("train", runs["cfg"], "--model.n_embd=64", "--model.n_head=4")
    assert res.code == 2
    assert "other model dimensions" in res.last_err and "n_embd: 32 -> 64" in res.last_err
    assert str(runs["run"]) in res.last_err
    assert (runs["run"] / "config.yaml").read_text() == before  # nothing was overwritten


def test_no_restorable_checkpoint_is_an_error_and_moves_nothing(runs):
    """An optimizer state whose arrays are not the checkpoint's (as after changing
    optim.freeze) means changed settings, not damage: refuse by name, keep the checkpoints."""
    import jax
    from flax import nnx

    from gpt2jax.errors import UserError
    from gpt2jax.model import abstract_model

    model, _, _ = load_run(runs["ref"])
    _, template = nnx.split(abstract_model(model.cfg))
    wrong_opt = [jax.ShapeDtypeStruct((3,), np.float32)] * 4
    ckpts = Checkpoints(runs["ref"])
    before = ckpts.steps()
    try:
        with pytest.raises(UserError, match=r"opt_state does not match this run \(4 arrays not "
                           r"in the checkpoint.*optim.freeze"):
            ckpts.restore_latest_good(template, wrong_opt)
    finally:
        ckpts.close()
    assert Checkpoints(runs["ref"], read_only=True).steps() == before
    assert not list((runs["ref"] / "checkpoints").glob("*.unreadable*"))


def test_corrupt_latest_falls_back_and_more_steps_continue(runs, cli):
    """Damage the newest checkpoint, then raise train.steps: the run resumes from the one
    before (on this process's 8 devices: another mesh) with a warning naming both."""
    run = runs["run"]
    ckpt = run / "checkpoints"
    latest, previous = STEPS, STEPS - 2
    assert Checkpoints(run, read_only=True).steps()[-2:] == [previous, latest]
    damaged = 0
    for f in (ckpt / str(latest)).rglob("*"):
        if f.is_file() and f.parent.name != "meta":
            f.write_bytes(b"\x00garbage" * 4)
            damaged += 1
    assert damaged
    more = STEPS + 2
    res = cli("train", runs["cfg"], f"--train.steps={more}", "--json")
    assert res.code == 0, res.err
    warning = next(ln for ln in res.err.splitlines() if "warning" in ln)
    assert str(ckpt / str(latest)) in warning and str(ckpt / str(previous)) in warning
    assert res.json["start_step"] == previous and res.json["final_step"] == more
    assert res.json["mesh"]["data"] == 8
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "split" not in r] == list(range(1, more + 1))
    # the damaged step was set aside (not deleted) and step `latest` was written afresh
    assert (ckpt / f"{latest}.unreadable").is_dir()
    assert {latest, more} <= set(Checkpoints(run, read_only=True).steps())
    assert _params(run, latest)["wte"].shape == (50257, 32)


def test_ctrl_c_saves_then_a_rerun_continues(runs):
    """A real SIGINT (delivered by the process to itself at a known step, as Ctrl-C would)
    saves a checkpoint at that step, exits 130 saying where, and the same command resumes
    from it; a second SIGINT is not needed to stop."""
    tmp = runs["tmp"]
    cfg = write_config(tmp / "ctrl-c.yaml", tmp / "ctrl-c", runs["data"],
                       train={"steps": 6, "checkpoint_every": 4, "eval_every": 0})
    trainer = Trainer(tmp)
    code, _, err = trainer.run(cfg, fault="int@step:3")
    assert code == 130, err
    m = re.search(r"interrupted: saved checkpoint at step 3 to (\S+)", err)
    assert m and Path(m.group(1)).is_dir(), err
    assert Checkpoints(tmp / "ctrl-c", read_only=True).steps() == [3]
    code, out, err = trainer.run(cfg, "--json")
    assert code == 0, err
    assert resumed_from(err) == 3 and json.loads(out)["final_step"] == 6


def test_a_run_directory_trains_one_process_at_a_time(runs, cli):
    """A second training of a run directory that another process is training is refused,
    naming the holder; the lock goes with its holder (here: this test process)."""
    from gpt2jax.run import RunDir

    holder = RunDir(runs["ref"])
    holder.lock()
    try:
        before = (runs["ref"] / "config.yaml").read_text()
        res = cli("train", runs["tmp"] / "ref.yaml")
        assert res.code == 2, res.err
        assert f"is in use: pid {os.getpid()} on " in res.last_err
        assert (runs["ref"] / "config.yaml").read_text() == before
    finally:
        holder.unlock()
    other = RunDir(runs["ref"])
    other.lock()  # free again once the holder let go
    other.unlock()
