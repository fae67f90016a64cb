"""`gpt2jax demo` end to end on a tiny model: train, define held-out words, export."""

from __future__ import annotations

import json
import re


def test_demo_trains_defines_and_exports(tmp_path, cli):
    run = tmp_path / "demo"
    res = cli("demo", "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2",
              "--data.limit=400", "--data.validation_fraction=0.05", "--train.steps=3",
              "--train.batch_size=8", "--train.seq_len=32", "--train.eval_every=0",
              "--train.checkpoint_every=0", "--train.progress=none", f"--train.run_dir={run}",
              "--json")
    assert res.code == 0, res.err[-3000:]
    out = res.out[: res.out.rindex("{")]  # the human-readable part before the JSON summary
    assert "held-out words" in out and "validation perplexity after 3 steps" in out
    # it says first what it will do, and last how long it took and where its outputs are
    assert res.err.lstrip().startswith("gpt2jax demo: trains a 1-layer GPT-2 from scratch")
    assert re.search(rf"demo done in \d+ s: run directory {run}, transformers export "
                     rf"{run / 'hf'}", out)
    summary = json.loads(res.out[res.out.rindex("\n{") + 1:])
    assert summary["final_step"] == 3 and len(summary["definitions"]) == 6
    # Held out: no (word, definition) pair shown to the model is in the training split.
    from gpt2jax.batches import split_records
    from gpt2jax.config import load_config
    from gpt2jax.data import load_records

    cfg = load_config(run / "config.yaml")
    records = load_records(cfg.data.train, text_unit=cfg.data.text_unit, limit=cfg.data.limit)
    train, _ = split_records(records.to_list(), cfg.data.validation_fraction, cfg.train.seed)
    seen = {(r["word"], r["definition"]) for r in train}
    assert not any((d["word"], d["reference"]) in seen for d in summary["definitions"])
    cfg = json.loads((run / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["n_layer"] == 1
    assert (run / "loss.png").is_file() and (run / "hf" / "model.safetensors").is_file()
