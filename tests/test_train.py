"""`gpt2jax train` end to end on the 8 fake CPU devices (in-process).

Fine-tuning an imported HF model on an FSDP mesh, then exporting it back: transformers
loads the export and its perplexity equals `gpt2jax eval` on the run. Classification
with both heads; the sequence head's export matches transformers' logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_checkpoint import private_data_cache, write_text  # noqa: F401 (autouse fixture)

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.params import flat as flat_params
from gpt2jax.run import load_run
from gpt2jax.tracking import read_metrics

EVAL_TEXT = "The river stone lay quiet in the morning light beside the old harbor engine."


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- fine-tuning an HF model


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, hf_lm_dir, cli):
    """Fine-tune the tiny HF model for 4 steps on a (data 2, fsdp 4) mesh."""
    tmp = tmp_path_factory.mktemp("finetune")
    src, _ = hf_lm_dir
    cfg = write_yaml(tmp / "cfg.yaml", {
        "model": {"init": str(src), "dropout": 0.0},
        "data": {"train": str(write_text(tmp / "text.txt", n_docs=20, words=40)), "task": "lm",
                 "validation_fraction": 0.2},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "linear"},
        "mesh": {"data": 2, "fsdp": 4},
        "train": {"steps": 4, "batch_size": 8, "seq_len": 32, "run_dir": str(tmp / "run"),
                  "log_every": 2, "eval_every": 2, "checkpoint_every": 2, "progress": "none"},
    })
    res = cli("train", cfg, "--optim.lr=2e-3", "--json")  # an override on top of the file
    assert res.code == 0, res.err
    return tmp, cfg, tmp / "run", res.json


def test_run_directory_holds_config_logs_checkpoints_and_plot(finetune):
    _, _, run, summary = finetune
    assert summary["start_step"] == 0 and summary["final_step"] == 4
    assert summary["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["optim"]["lr"] == 2e-3 and resolved["mesh"]["fsdp"] == 4
    assert resolved["train"]["keep_checkpoints"] == 3  # defaults are written out too
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for r in train_rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
    # the lr of the step logged as 4 (index 3): linear decay after 1 warmup step, 2 of 3 done
    assert train_rows[1]["lr"] == pytest.approx(2e-3 * (1 - 2 / 3), rel=1e-5)
    val = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in val] == [2, 4] and all(r["perplexity"] > 1 for r in val)
    assert summary["validation"]["loss"] == pytest.approx(val[-1]["loss"])
    assert Checkpoints(run, read_only=True).steps() == [2, 4]
    best = summary["best"]
    assert best["metric"] == "loss" and best["value"] == min(r["loss"] for r in val)
    assert Checkpoints(run, read_only=True).best() == best["step"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads((run / "model.json").read_text())
    assert recorded["n_embd"] == 32
    # the automatic choices as fixed for this CPU (docs/benchmarks.md, "Kernels per platform")
    assert (recorded["kernels"], recorded["attention"]) == ("custom", "explicit")


def test_export_loads_in_transformers_with_equal_perplexity(finetune, hf_lm_dir, cli):
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2jax.tokenizer import gpt2_tokenizer

    tmp, _, run, _ = finetune
    text = tmp / "eval.txt"
    text.write_text(EVAL_TEXT)
    res = cli("export", "--model", run, "--out", tmp / "export", "--json")
    assert res.code == 0, res.err
    hf = GPT2LMHeadModel.from_pretrained(str(tmp / "export")).eval()
    ids = [gpt2_tokenizer().eos_token_id, *gpt2_tokenizer()(EVAL_TEXT)["input_ids"]]
    assert len(ids) < 64  # one window: eval scores every token after <|endoftext|>
    with torch.no_grad():
        t = torch.tensor([ids])
        hf_ppl = float(torch.exp(hf(t, labels=t).loss))
    res = cli("eval", "--model", run, "--data", text, "--json")
    assert res.code == 0, res.err
    assert res.json["tokens"] == len(ids) - 1
    assert res.json["perplexity"] == pytest.approx(hf_ppl, rel=1e-4)
    # fine-tuning really changed the imported weights
    _, base = hf_lm_dir
    with torch.no_grad():
        base_ppl = float(torch.exp(base(t, labels=t).loss))
    assert abs(base_ppl - hf_ppl) / base_ppl > 1e-3
    moved = hf.transformer.h[0].mlp.c_fc.weight - base.transformer.h[0].mlp.c_fc.weight
    assert float(moved.detach().abs().max()) > 1e-4


def test_fsdp_run_restores_on_one_device(finetune):
    """Saved from 8 devices with fsdp=4; load_run restores onto one device."""
    import jax
    from flax import nnx

    from gpt2jax.model import abstract_model
    from gpt2jax.sharding import make_mesh, state_shardings

    _, _, run, _ = finetune
    model, _, _ = load_run(run)
    one = flat_params(nnx.state(model, nnx.Param))
    assert all(v.sharding.device_set == {jax.devices()[0]} for v in one.values())
    # the same checkpoint onto the training mesh: weights split over fsdp
    mesh = make_mesh(2, 4, 1)
    _, template = nnx.split(abstract_model(model.cfg))
    params, _, meta = Checkpoints(run, read_only=True).restore(
        4, template, shardings=state_shardings(template, mesh))
    sharded = flat_params(params)
    assert meta["step"] == 4
    assert "fsdp" in sharded["h.0.mlp.c_fc_kernel"].sharding.spec
    for name, value in sharded.items():
        assert np.array_equal(np.asarray(value), np.asarray(one[name])), name


def test_a_cudnn_run_loads_with_explicit_attention_without_a_gpu(finetune, tmp_path):
    """model.json keeps model.attention; on a machine without an NVIDIA GPU, loading the
    run for eval/generate/export falls back to the same maths (explicit attention)."""
    import json
    import shutil

    from gpt2jax.run import load_run

    _, _, run, _ = finetune
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta.update(attention="cudnn", dtype="bfloat16")
    (copy / "model.json").write_text(json.dumps(meta))
    model, _, _ = load_run(copy)
    assert (model.cfg.attention, model.cfg.dtype) == ("explicit", "bfloat16")
    ref, _, _ = load_run(run, dtype="bfloat16")
    ids = np.arange(1, 9)[None]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(ref(ids)))


def test_init_source_fixes_the_architecture(finetune, cli, tmp_path):
    _, cfg, _, _ = finetune
    res = cli("train", cfg, f"--train.run_dir={tmp_path / 'other'}", "--model.n_layer=4")
    assert res.code == 2
    assert "model.n_layer=4 but the source has 2" in res.last_err


# ---------------------------------------------------------------- classification

MOODS = {"pos": "sunny bright warm cheerful", "neg": "rainy cold dark gloomy",
         "neu": "cloudy mild grey plain"}


def write_csv(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for i in range(n):
        label = list(MOODS)[i % 3]
        words = rng.choice(MOODS[label].split() + ["the", "day", "was", "very"], 6)
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    return tmp, write_csv(tmp / "train.csv", 48, 0), write_csv(tmp / "val.csv", 16, 1)


@pytest.mark.parametrize("head", ["sequence", "attention_pool"])
def test_classification_training_learns_and_eval_recomputes(cls_data, cli, head):
    """Both heads learn the separable moods (the loss falls); the run's validation
    accuracy equals `gpt2jax eval` on the run and the accuracy recomputed from its
    predictions file; the predicted probabilities equal transformers' (sequence head:
    the export; attention_pool: GPT2Model on the backbone-only export plus the head file
    through a numpy implementation of the head)."""
    tmp, _, val_csv = cls_data
    train_csv = write_csv(tmp / "train8.csv", 8, 2)  # one full batch: every step sees all
    run = tmp / f"run-{head}"
    cfg = write_yaml(tmp / f"{head}.yaml", {
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "head": head,
                  "dropout": 0.0, "classifier_dropout": 0.0},
        "data": {"train": str(train_csv), "validation": str(val_csv), "task": "classification"},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"steps": 6, "batch_size": 8, "seq_len": 32, "run_dir": str(run),
                  "log_every": 1, "eval_every": 3, "checkpoint_every": 3, "progress": "none"},
    })
    res = cli("train", cfg, "--json")
    assert res.code == 0, res.err
    summary = res.json
    assert summary["best"]["metric"] == "accuracy"
    rows = read_metrics(run / "metrics.jsonl")
    val = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in val] == [3, 6] and all(r["examples"] == 16 for r in val)
    losses = [r["loss"] for r in rows if "split" not in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses  # it learns
    preds = tmp / f"pred-{head}.jsonl"
    res = cli("eval", "--model", run, "--data", val_csv, "--predictions", preds, "--json")
    assert res.code == 0, res.err
    lines = [json.loads(ln) for ln in preds.read_text().splitlines()]
    recomputed = np.mean([ln["predicted"] == ln["label"] for ln in lines])
    assert len(lines) == 16 and res.json["accuracy"] == pytest.approx(recomputed)
    assert val[-1]["accuracy"] == pytest.approx(recomputed)
    model, tok, _ = load_run(run)
    assert model.cfg.head == head and model.cfg.labels == ("neg", "neu", "pos")
    if head == "sequence":
        _check_sequence_export(model, tok, run, tmp, cli)
    else:
        _check_attention_pool_export(lines, tok, run, tmp, cli)


def _check_attention_pool_export(lines, tok, run, tmp, cli):
    """The predictions' probabilities from transformers' backbone + the numpy head."""
    from safetensors.numpy import load_file
    from test_attention_pool_reference import HEAD, hf_backbone_hidden, numpy_pool

    from gpt2jax.batches import pad_rows

    out = tmp / "pool-export"
    res = cli("export", "--model", run, "--out", out, "--backbone-only")
    assert res.code == 0, res.err
    head = load_file(str(out / "attention_pool_head.safetensors"))
    rows = [tok(ln["text"])["input_ids"] for ln in lines]
    ids, mask = pad_rows(rows, max(map(len, rows)), tok.eos_token_id)
    z = numpy_pool(hf_backbone_hidden(out, ids, mask), mask, {k: head[f"pool.{k}"] for k in HEAD})
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    got = np.array([[ln["probabilities"][n] for n in ("neg", "neu", "pos")] for ln in lines])
    np.testing.assert_allclose(got, probs, atol=1e-5)


def _check_sequence_export(model, tok, run, tmp, cli):
    """transformers' GPT2ForSequenceClassification on the export gives our logits."""
    import torch
    from transformers import AutoModelForSequenceClassification

    res = cli("export", "--model", run, "--out", tmp / "cls-export")
    assert res.code == 0, res.err
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp / "cls-export")).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    texts = ["sunny warm day", "the day was very cold and dark today", "grey"]
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tok.eos_token_id, np.int32)  # right padding with eos
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    ours = np.asarray(model(ids, mask))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=1e-4)
    assert ours.shape == (3, 3) and np.abs(ours).max() > 1e-3


def test_freeze_trains_only_the_head_on_a_sharded_mesh(cls_data, cli):
    """optim.freeze in a real (fsdp-sharded) run: the backbone stays at its init."""
    from gpt2jax.hf import to_flat_params
    from gpt2jax.model import create_model

    tmp, train_csv, val_csv = cls_data
    run = tmp / "run-frozen"
    cfg = write_yaml(tmp / "frozen.yaml", {
        "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "head": "sequence"},
        "data": {"train": str(train_csv), "task": "classification"},
        "optim": {"lr": 3e-2, "freeze": [r"^(wte|wpe|h\.|ln_f)"]},
        "mesh": {"data": 4, "fsdp": 2},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 32, "run_dir": str(run),
                  "eval_every": 0, "progress": "none"},
    })
    res = cli("train", cfg)
    assert res.code == 0, res.err
    model, _, _ = load_run(run)
    trained, init = to_flat_params(model), to_flat_params(create_model(model.cfg, seed=0))
    for name in trained:
        # The run initialises under jit, which rounds the N(0, 0.02) draws ~1e-8 apart from
        # this eager init; a trained tensor moves by ~lr = 3e-2.
        same = np.allclose(trained[name], init[name], rtol=0, atol=1e-6)
        assert same == (not name.startswith("score.")), name


def test_run_dir_check_is_safe_when_every_process_runs_it(tmp_path):
    """All processes of a multi-process run check the same run directory at once; a shared
    probe file made one process delete another's probe ('not writable (No such file or
    directory)', seen in the two-process test). Eight threads, 50 checks each."""
    from concurrent.futures import ThreadPoolExecutor

    from gpt2jax.run import RunDir

    run = tmp_path / "run"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: RunDir(run).check_writable(), range(400)))  # raises on any failure
    assert run.is_dir() and not list(run.iterdir())  # no probe left behind


def test_results_name_the_checkpoint_step_they_used(finetune, cli):
    """`latest` and `best` are resolved: results say which step was read."""
    _, _, run, _ = finetune
    res = cli("score", "--model", run, "--prompt", "The river", "--answer", " stone", "--json")
    assert res.code == 0, res.err
    assert res.json["model"] == f"{run} (step 4)" and res.json["logprob"] < 0
    res = cli("export", "--model", run, "--step", "best", "--out", run / "best-export", "--json")
    assert res.code == 0, res.err
    assert res.json["source"] in (f"{run} (step 2)", f"{run} (step 4)")
