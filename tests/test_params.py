"""Parameter names and layer layouts (params.py), and the two resume paths that depend on
them: a run resumed with model.scan_layers switched, and an optimizer state whose arrays
changed (optim.freeze moved), which must be refused by name, never filled by position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from test_checkpoint import private_data_cache, write_text  # noqa: F401 (autouse fixture)

from gpt2jax import params as P


def test_names_of_a_model_and_its_optimizer_state():
    import jax
    from flax import nnx

    from gpt2jax.config import OptimSection
    from gpt2jax.model import GPT2Config, abstract_model
    from gpt2jax.optim import make_optimizer

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    _, state = nnx.split(abstract_model(cfg))
    names = set(P.flat(state))
    # written out by hand from GPT-2's module names (the HF mapping relies on them)
    block = {"ln_1.scale", "ln_1.bias", "attn.c_attn_kernel", "attn.c_attn_bias",
             "attn.c_proj_kernel", "attn.c_proj_bias", "ln_2.scale", "ln_2.bias",
             "mlp.c_fc_kernel", "mlp.c_fc_bias", "mlp.c_proj_kernel", "mlp.c_proj_bias"}
    assert names == {"wte", "wpe", "ln_f.scale", "ln_f.bias"} | {
        f"h.{i}.{b}" for i in range(2) for b in block}
    tx, _ = make_optimizer(OptimSection(freeze=[r"^h\.0\."]), 10, state)
    opt = P.flat(jax.eval_shape(tx.init, state))
    mu = {n.split(".mu.", 1)[1] for n in opt if ".mu." in n}
    assert mu == {n for n in names if not n.startswith("h.0.")}  # frozen: no moments


def test_relayout_round_trip_against_numpy():
    rng = np.random.default_rng(0)
    per_layer = {f"h.{i}.attn.w": rng.normal(size=(3, 2)) for i in range(4)}
    per_layer |= {f"opt.1.mu.h.{i}.ln.b": np.full(2, float(i)) for i in range(4)}
    per_layer["wte"] = rng.normal(size=(5, 2))
    stacked = P.relayout(per_layer, 4, stacked=True)
    assert set(stacked) == {"h.attn.w", "wte", "opt.1.mu.h.ln.b"}
    np.testing.assert_array_equal(stacked["h.attn.w"],
                                  np.stack([per_layer[f"h.{i}.attn.w"] for i in range(4)]))
    np.testing.assert_array_equal(stacked["opt.1.mu.h.ln.b"], [[0, 0], [1, 1], [2, 2], [3, 3]])
    assert P.is_stacked(stacked) and not P.is_stacked(per_layer)
    assert P.layer_count(stacked) == P.layer_count(per_layer) == 4
    back = P.relayout(stacked, 4, stacked=False)
    assert back.keys() == per_layer.keys()
    for k in back:
        np.testing.assert_array_equal(back[k], per_layer[k])
    with pytest.raises(ValueError, match="layers"):
        P.stack({"h.0.w": 1, "h.2.w": 2}, 3)


def _cfg(tmp: Path, run: Path, **model) -> dict:
    return {
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "dropout": 0.0,
                  "loss_chunk": 0, **model},
        "data": {"train": str(write_text(tmp / "text.txt", n_docs=8, words=40)), "task": "lm",
                 "validation_fraction": 0.0},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "run_dir": str(run),
                  "log_every": 1, "eval_every": 0, "checkpoint_every": 2, "progress": "none"},
    }


def _train(tmp: Path, cfg: dict, *overrides: str) -> dict:
    from gpt2jax.config import load_config
    from gpt2jax.train import train

    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(path, list(overrides)))


def test_resume_with_scan_layers_switched_continues_the_run(tmp_path):
    """scan_layers is a compute choice: a run checkpointed per layer resumes stacked on an
    8-device mesh (data x fsdp x tensor, optimizer moments included), and ends where the
    uninterrupted run ends; the stacked checkpoint then loads per layer."""
    from flax import nnx

    from gpt2jax.run import load_run

    ref = _train(tmp_path, _cfg(tmp_path, tmp_path / "ref"))
    run = tmp_path / "run"
    _train(tmp_path, _cfg(tmp_path, run), "--train.steps=2")
    out = _train(tmp_path, _cfg(tmp_path, run, scan_layers=True))
    assert out["start_step"] == 2 and out["final_step"] == 4
    # float32 noise only: scan and the unrolled loop order a few reductions differently
    assert out["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    a, _, _ = load_run(run)  # model.json says stacked now; the checkpoint is stacked too
    b, _, _ = load_run(tmp_path / "ref")
    assert a.cfg.scan_layers and not b.cfg.scan_layers
    fa = P.relayout({k: np.asarray(v) for k, v in P.flat(nnx.state(a, nnx.Param)).items()},
                    2, stacked=False)
    fb = {k: np.asarray(v) for k, v in P.flat(nnx.state(b, nnx.Param)).items()}
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-4, atol=1e-5, err_msg=k)
    c, _, _ = load_run(run, scan_layers=False)  # the stacked checkpoint, per layer
    fc = {k: np.asarray(v) for k, v in P.flat(nnx.state(c, nnx.Param)).items()}
    assert not c.cfg.scan_layers and fc.keys() == fa.keys()
    assert all(np.array_equal(fc[k], fa[k]) for k in fa)


def test_moved_freeze_is_refused_by_name_and_changes_nothing(tmp_path, cli, capsys):
    """Freezing layer 1 instead of layer 0 gives an optimizer state of the same leaf shapes;
    restored by position, layer 0's moments would land on layer 1. It is refused. (The
    first run's warmup is longer than the run, which is warned.)"""
    cfg = _cfg(tmp_path, tmp_path / "run")
    cfg["optim"].update(freeze=[r"^h\.0\."], warmup_steps=5, schedule="cosine")
    _train(tmp_path, cfg, "--train.steps=2")
    assert ("warning: optim.warmup_steps=5 is not below the run's 2 steps, so the learning "
            "rate never reaches optim.lr") in capsys.readouterr().err
    before = (tmp_path / "run" / "config.yaml").read_text()
    cfg["optim"]["freeze"] = [r"^h\.1\."]
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = cli("train", path)
    assert res.code == 2, res.err
    assert "opt_state does not match this run" in res.last_err
    assert "optim.freeze" in res.last_err and "mu.h.0." in res.last_err
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # nothing overwritten
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]

