"""Every config in configs/ trains offline for 2 steps with its data pointed at local files.

Each run overrides only what makes it tiny and local (model.init=scratch, tiny dimensions,
batch, seq_len, steps, run_dir, data files); every other key keeps the config's value, so
a broken key, task or head in a shipped config fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpt2jax.config import load_config
from gpt2jax.tracking import read_metrics

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
TINY = ["--model.init=scratch", "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2",
        "--model.n_positions=64", "--train.steps=2", "--train.batch_size=8",
        "--train.seq_len=32", "--train.progress=none", "--train.log_every=1"]
ZH = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。",
      "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
      "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
      "今天天气很好，我们一起去公园散步吧。"]
WORDS = "river stone light quiet morning harbor engine garden window paper".split()


def _write_fixtures(d: Path) -> dict[str, Path]:
    """Small local files of each shape the configs read."""
    rng = np.random.default_rng(0)
    files = {}
    files["dictionary"] = d / "dictionary.jsonl"
    files["dictionary"].write_text("".join(
        json.dumps({"word": w, "definition": f"a {w} made of {WORDS[(i + 3) % 10]} and "
                    f"{WORDS[(i + 5) % 10]}", "example": f"the {w} was there" if i % 2 else ""})
        + "\n" for i, w in enumerate(WORDS * 30)))
    files["chat"] = d / "chats.jsonl"
    files["chat"].write_text("".join(json.dumps({"messages": [
        {"speaker": "ana", "text": f"hey {WORDS[i % 10]}?", "timestamp": f"2024-01-0{i % 9 + 1}"},
        {"speaker": "ben", "text": f"omw with the {WORDS[(i + 1) % 10]} lol"},
        {"speaker": "ana", "text": "ok see u"}]}) + "\n" for i in range(30)))
    files["zh"] = d / "corpus_zh.txt"
    files["zh"].write_text("\n\n".join(ZH[i % 4] for i in range(40)), encoding="utf-8")
    for name, n_classes in (("topics", 20), ("sentiment", 2)):
        for split, n in (("train", 60), ("test", 20)):
            rows = ["text,label"]
            for i in range(n):
                y = i % n_classes  # every class occurs
                words = " ".join(rng.choice(WORDS, 5))
                rows.append(f"{words} topic{y},{'c' + str(y) if n_classes > 2 else y}")
            files[f"{name}_{split}"] = d / f"{name}_{split}.csv"
            files[f"{name}_{split}"].write_text("\n".join(rows) + "\n")
    files["text_dir"] = d / "text"
    files["text_dir"].mkdir()
    for i in range(6):
        (files["text_dir"] / f"doc{i}.txt").write_text(
            " ".join(rng.choice(WORDS, 80)) + ".\n")
    return files


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    return _write_fixtures(tmp_path_factory.mktemp("config-data"))


def _data_overrides(cfg_path: Path, files: dict[str, Path]) -> list[str]:
    """data.train / data.validation (and columns the local files name differently)."""
    cfg = load_config(cfg_path)
    d = cfg.data
    if d.task == "classification":
        name = "topics" if cfg.model.head == "attention_pool" else "sentiment"
        return [f"--data.train={files[name + '_train']}",
                f"--data.validation={files[name + '_test']}", "--data.label_column=label"]
    local = {"dictionary_forward": "dictionary", "dictionary_reverse": "dictionary",
             "conversation": "chat"}.get(d.task)
    if local is None:  # plain text: Chinese for the Chinese config, a folder for the rest
        local = "zh" if "zh" in d.train or "chinese" in cfg_path.name else "text_dir"
    return [f"--data.train={files[local]}"]


def test_every_config_is_covered():
    names = {p.name for p in CONFIGS}
    assert {"dictionary_forward.yaml", "dictionary_reverse.yaml", "texting_style.yaml",
            "chinese_text.yaml", "newsgroups_attention_head.yaml", "sentiment.yaml",
            "gpt2_124m_pretrain.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_trains_two_steps_offline(path, fixtures, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))  # not the user's cache
    run = tmp_path / "run"
    res = cli("train", path, *TINY, f"--train.run_dir={run}", *_data_overrides(path, fixtures),
              "--json")
    assert res.code == 0, res.err
    summary = res.json
    assert summary["final_step"] == 2 and summary["train_loss"] is not None
    assert np.isfinite(summary["train_loss"])
    model = json.loads((run / "model.json").read_text())
    # Hand calculation: from scratch, N(0, 0.02) weights give nearly uniform predictions,
    # so the first step's loss is ln(number of classes) (logits of std ~0.1 add ~0.01).
    classes = len(model["labels"]) if model["head"] != "lm" else model["vocab_size"]
    first = [r for r in read_metrics(run / "metrics.jsonl") if "split" not in r][0]
    assert first["step"] == 1 and abs(first["loss"] - np.log(classes)) < 0.05, first
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    original = yaml.safe_load(path.read_text())
    # every key the config sets survives, except the ones this test overrides
    overridden = {"init", "n_layer", "n_embd", "n_head", "n_positions", "steps", "batch_size",
                  "seq_len", "progress", "log_every", "run_dir", "train", "validation",
                  "label_column"}
    for section, keys in original.items():
        for key, value in keys.items():
            if key not in overridden:
                assert resolved[section][key] == value, f"{section}.{key}"
    assert model["n_embd"] == 32 and model["head"] == original["model"].get("head", "lm")
    data_rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "data"]
    assert data_rows and data_rows[0]["bytes_per_token"] > 0
    assert list((tmp_path / "cache" / "tokenized").glob("*/meta.json"))  # tokenized once, cached
    if original["data"]["task"] == "classification":
        n_classes = 20 if model["head"] == "attention_pool" else 2
        assert len(model["labels"]) == n_classes
        cm = np.asarray(summary["validation"]["confusion_matrix"])
        assert cm.shape == (n_classes, n_classes)
        assert summary["validation"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert summary["validation"]["perplexity"] > 1
    if "chinese" in path.name:  # GPT-2's BPE spends more than a byte per token on Chinese
        assert data_rows[0]["bytes_per_token"] < 2.5
