"""Early stopping (train.early_stop) on a run whose validation loss stops improving.

One in-process run, from scratch with a high learning rate on a few short documents, so
the validation loss falls for a few evaluations and then rises. It is preempted (SIGTERM,
GPT2JAX_FAULT) after an evaluation that did not improve and resumed: the evaluation it
stops at is computed by hand from metrics.jsonl's evaluation rows, so a resume that lost
the patience count would stop later. The best checkpoint is what `--step best` exports
and evaluates; the validation rows were computed with the run's document packing (checked
against transformers, one document piece at a time).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_checkpoint import private_data_cache, write_text  # noqa: F401 (autouse fixture)
from test_packing import piecewise_nll

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.tracking import read_metrics

PATIENCE, MIN_DELTA, STEPS, PREEMPT_AT = 3, 0.1, 40, 11
EVAL_TEXT = "river stone light window garden morning quiet paper harbor engine."


def expected_stop(rows: list[dict], patience: int, min_delta: float) -> dict:
    """The documented rule, by hand: count the evaluations since the loss last beat the
    reference (the last loss that beat its predecessor reference by more than min_delta)."""
    reference, waited, best, waits = None, 0, None, {}
    for r in rows:
        if best is None or r["loss"] < best["loss"]:
            best = r
        if reference is None or r["loss"] < reference["loss"] - min_delta:
            reference, waited = r, 0
        else:
            waited += 1
        waits[r["step"]] = waited
        if waited == patience:
            return {"step": r["step"], "best": best["step"], "reference": reference["step"],
                    "waits": waits}
    raise AssertionError(f"the validation loss never stopped improving: {rows}")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, cli):
    tmp = tmp_path_factory.mktemp("early_stop")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "dropout": 0.0},
        "data": {"train": str(write_text(tmp / "train.txt", n_docs=6, words=30, seed=1)),
                 "validation": str(write_text(tmp / "val.txt", n_docs=6, words=30, seed=2)),
                 "packing": "documents"},
        "optim": {"lr": 2e-2, "schedule": "constant"},
        "train": {"steps": STEPS, "batch_size": 8, "seq_len": 16, "log_every": 2,
                  "eval_every": 2, "eval_batches": 1, "checkpoint_every": 100,
                  "progress": "none", "run_dir": str(tmp / "run"),
                  "early_stop": {"patience": PATIENCE, "min_delta": MIN_DELTA}},
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2JAX_FAULT", f"term@step:{PREEMPT_AT}")
        first = cli("train", cfg, "--json")
    assert first.code == 143, first.err  # preempted, checkpoint saved
    res = cli("train", cfg, "--json")  # resumes from PREEMPT_AT
    assert res.code == 0, res.err
    return tmp, cfg, tmp / "run", res


def test_stops_at_the_evaluation_the_rule_gives_and_a_resume_keeps_the_count(stopped):
    _, _, run, res = stopped
    rows = read_metrics(run / "metrics.jsonl")
    evals = [r for r in rows if r.get("split") == "validation"]
    want = expected_stop(evals, PATIENCE, MIN_DELTA)
    # the premises: the stop comes before train.steps, the preemption after an evaluation
    # that did not improve (the count was nonzero when the resumed run read it back), and
    # one improvement smaller than min_delta moved the best step but not the reference
    assert want["step"] < STEPS and PREEMPT_AT < want["step"]
    assert want["waits"][PREEMPT_AT - 1] > 0
    assert want["best"] > want["reference"]
    s = res.json
    assert s["start_step"] == PREEMPT_AT and s["final_step"] == want["step"]
    assert [r["step"] for r in evals] == list(range(2, want["step"] + 1, 2))
    assert s["best"]["step"] == want["best"]
    assert s["stopped"] == {"reason": "early_stop", "metric": "loss", "patience": PATIENCE,
                            "min_delta": MIN_DELTA, "best_step": want["best"],
                            "best_value": pytest.approx(min(r["loss"] for r in evals))}
    stop_rows = [r for r in rows if r.get("split") == "stop"]
    assert stop_rows == [{"step": want["step"], "split": "stop", **s["stopped"]}]
    train_rows = [r for r in rows if "split" not in r]
    assert train_rows[-1]["step"] == want["step"]  # no step after the stop
    # the best checkpoint is kept, and the resumed run's checkpoints carry the count
    ckpts = Checkpoints(run, read_only=True)
    assert ckpts.best() == want["best"] and want["best"] in ckpts.steps()
    assert ckpts.meta(want["step"])["early_stop"]["waited"] == PATIENCE


def test_running_the_command_again_takes_no_step(stopped, cli):
    _, cfg, run, res = stopped
    last = res.json["final_step"]
    again = cli("train", cfg)
    assert again.code == 0, again.err
    assert f"steps {last} -> {last}" in again.out
    assert ("stopped early: validation loss did not improve by more than 0.1 in 3 evaluations; "
            f"best {res.json['best']['value']:.4g} at step {res.json['best']['step']}") in again.out
    assert Checkpoints(run, read_only=True).latest() == last


def test_step_best_is_the_best_evaluation(stopped, cli):
    """`export --step best` loads in transformers with the perplexity `eval --step best`
    reports; the validation row of the best step is transformers' loss on the validation
    blocks taken one document piece at a time (validation used data.packing=documents)."""
    import torch
    from transformers import GPT2LMHeadModel

    tmp, _, run, res = stopped
    best = res.json["best"]["step"]
    out = cli("export", "--model", run, "--step", "best", "--out", tmp / "best", "--json")
    assert out.code == 0, out.err
    assert out.json["source"] == f"{run} (step {best})"
    hf = GPT2LMHeadModel.from_pretrained(str(tmp / "best")).eval()
    (tmp / "eval.txt").write_text(EVAL_TEXT)
    ev = cli("eval", "--model", run, "--step", "best", "--data", tmp / "eval.txt", "--json")
    assert ev.code == 0, ev.err
    assert ev.json["model"] == f"{run} (step {best})"
    eos = 50256
    ids = [eos, *_tokenizer()(EVAL_TEXT)["input_ids"]]
    with torch.no_grad():
        t = torch.tensor([ids])
        assert ev.json["perplexity"] == pytest.approx(float(torch.exp(hf(t, labels=t).loss)),
                                                      rel=1e-4)
    row = next(r for r in read_metrics(run / "metrics.jsonl")
               if r.get("split") == "validation" and r["step"] == best)
    nll, count = piecewise_nll(hf, _validation_batch(run))
    assert count == row["tokens"]
    assert row["loss"] == pytest.approx(nll / count, rel=1e-4)


def _tokenizer():
    from gpt2jax.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def _validation_batch(run: Path) -> dict:
    """The run's validation batch of each evaluation (eval_batches 1), as run_eval reads it."""
    from gpt2jax.batches import Batcher, prepare
    from gpt2jax.config import read_run_config

    cfg = read_run_config(run)
    t = cfg.train
    val = prepare(cfg.data, _tokenizer(), seq_len=t.seq_len, seed=t.seed, eos=50256).validation
    return Batcher(val, t.batch_size, seed=t.seed + 1, pad_id=50256, max_len=t.seq_len).batch(0)


def test_accuracy_counts_up_and_small_gains_move_the_best_only():
    """A classification run's accuracy (higher is better), by hand: min_delta 0.06 and
    patience 2 over 0.50, 0.60, 0.65, 0.67, 0.64, 0.66, 0.70 at steps 10, 20, ...: 0.65
    is a new best but within min_delta of the reference 0.60 (count 1); 0.67 beats it by
    more (count 0); 0.64 and 0.66 do not (count 2 at step 60: stop, best step 40)."""
    from gpt2jax.config import load_config
    from gpt2jax.train import Watch

    cfg = load_config(None, ["--data.train=x.csv", "--data.task=classification",
                             "--model.head=sequence", "--train.early_stop.patience=2",
                             "--train.early_stop.min_delta=0.06"])
    watch = Watch(cfg.train, True, {})
    stopped = None
    for step, acc in zip(range(10, 80, 10), [0.50, 0.60, 0.65, 0.67, 0.64, 0.66, 0.70]):
        watch.update({"accuracy": acc, "macro_f1": 0.0}, step)
        if watch.exhausted():
            stopped = step
            break
    assert (stopped, watch.best_step(), watch.best["value"]) == (60, 40, 0.67)
    # a resumed run reads the count back from a checkpoint's meta
    again = Watch(cfg.train, True, watch.state())
    assert again.exhausted() and again.best == watch.best
