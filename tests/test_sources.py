"""Model sources: what a SRC string names, hub download errors, loading, a run's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2jax.errors import UserError
from gpt2jax.run import load_model, tokenizer_for
from gpt2jax.sources import HUB_PATTERNS, Source, hub_download, resolve


def _run_dir(root: Path, *steps: int) -> Path:
    """The layout resolve() recognises as a gpt2jax run: config.yaml + checkpoints/N."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  steps: 1\n")
    for step in steps:
        (run / "checkpoints" / str(step)).mkdir()
    return run


def _hf_like_dir(root: Path, name: str = "hf") -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return d


# ---------------------------------------------------------------- resolve: each kind


def test_resolve_run_dir_latest_and_chosen_step(tmp_path):
    run = _run_dir(tmp_path, 5)
    assert resolve(str(run)) == Source("run", str(run), None)
    assert resolve(str(run), 5) == Source("run", str(run), 5)
    assert resolve(str(run), "best") == Source("run", str(run), "best")


def test_resolve_checkpoint_dir_is_its_run_at_that_step(tmp_path):
    run = _run_dir(tmp_path, 5, 10)
    assert resolve(str(run / "checkpoints" / "10")) == Source("checkpoint", str(run), 10)
    # the number comes from the directory name, not from `step`
    assert resolve(str(run / "checkpoints" / "5"), 10).step == 5


def test_resolve_transformers_dir(tmp_path):
    d = _hf_like_dir(tmp_path)
    assert resolve(str(d)) == Source("hf_dir", str(d))


def test_resolve_run_wins_over_config_json(tmp_path):
    run = _run_dir(tmp_path, 1)
    (run / "config.json").write_text("{}")
    assert resolve(str(run)).kind == "run"
    assert resolve(f"hf:{run}") == Source("hf_dir", str(run))  # unless forced


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "org/name-v1.5"])
def test_resolve_hub_names(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # nothing of that name exists here
    assert resolve(name) == Source("hub", name)


def test_resolve_forced_prefixes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _run_dir(tmp_path, 3)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve("hf:gpt2") == Source("hub", "gpt2")
    assert resolve("hf:org/name") == Source("hub", "org/name")
    # hf: takes a directory without config.json too (loading then says what is missing)
    assert resolve(f"hf:{plain}") == Source("hf_dir", str(plain))
    assert resolve(f"run:{run}", 3) == Source("run", str(run), 3)
    assert resolve("run:run") == Source("run", "run")  # relative to the working directory


def test_resolve_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    d = _hf_like_dir(tmp_path, "mine")
    assert resolve("~/mine") == Source("hf_dir", str(d))


# ---------------------------------------------------------------- resolve: errors


@pytest.mark.parametrize("src", ["", "hf:", "run:"])
def test_resolve_empty_source(tmp_path, monkeypatch, src):
    # the working directory is a transformers dir: a bare "hf:" must still not mean it
    monkeypatch.chdir(_hf_like_dir(tmp_path))
    with pytest.raises(UserError, match="empty model source"):
        resolve(src)


def test_resolve_existing_dir_that_is_neither(tmp_path):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="neither a transformers directory.*nor a gpt2jax run"):
        resolve(str(d))
    # a run without checkpoints/ is not a run either
    (d / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="neither"):
        resolve(str(d))


def test_resolve_existing_file_is_neither(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0")
    with pytest.raises(UserError, match="neither"):
        resolve(str(f))


def test_resolve_unfinished_checkpoint_dir_is_neither(tmp_path):
    run = _run_dir(tmp_path)
    tmp_ckpt = run / "checkpoints" / "7.orbax-checkpoint-tmp"
    tmp_ckpt.mkdir()
    with pytest.raises(UserError, match="neither"):
        resolve(str(tmp_ckpt))


@pytest.mark.parametrize("rel", ["nowhere/deeper/model", "./gpt2", "~/nowhere/model"])
def test_resolve_missing_path(tmp_path, monkeypatch, rel):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="does not exist; check the path"):
        resolve(rel)


def test_resolve_unknown_user_home():
    # pathlib raises RuntimeError here; it must reach the user as one error line
    with pytest.raises(UserError, match="cannot expand its ~"):
        resolve("~nobody-gpt2jax-xyz/model")


def test_resolve_missing_absolute_path(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(UserError, match=f"{missing} does not exist"):
        resolve(str(missing))
    with pytest.raises(UserError, match="does not exist"):
        resolve(f"hf:{missing}")  # forcing hf: does not turn a missing path into a hub name


def test_resolve_run_prefix_on_a_non_run(tmp_path):
    hf_dir = _hf_like_dir(tmp_path)
    ckpt = _run_dir(tmp_path, 4) / "checkpoints" / "4"
    for target in (hf_dir, ckpt, tmp_path / "missing"):
        with pytest.raises(UserError, match="is not a gpt2jax run directory"):
            resolve(f"run:{target}")


def test_cli_reports_source_errors_with_exit_2(cli, tmp_path):
    d = tmp_path / "neither"
    d.mkdir()
    res = cli("export", "--model", d, "--out", tmp_path / "out")
    assert res.code == 2
    assert res.last_err.startswith("gpt2jax: error: ")
    assert "is neither a transformers directory" in res.last_err
    assert str(d) in res.last_err
    assert not (tmp_path / "out").exists()

    res = cli("export", "--model", f"run:{d}", "--out", tmp_path / "out")
    assert res.code == 2
    assert res.last_err == (f"gpt2jax: error: {d} is not a gpt2jax run directory "
                            "(no config.yaml + checkpoints/)")


# ---------------------------------------------------------------- describe


def test_describe():
    assert Source("run", "runs/a").describe() == "runs/a (step latest)"
    assert Source("run", "runs/a", "best").describe() == "runs/a (step best)"
    assert Source("checkpoint", "runs/a", 0).describe() == "runs/a (step 0)"  # 0 is a step
    assert Source("hf_dir", "/m/gpt2").describe() == "/m/gpt2"
    assert Source("hub", "openai-community/gpt2").describe() == "openai-community/gpt2"


# ---------------------------------------------------------------- hub_download


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_hub_download_offline_is_a_user_error(monkeypatch, value):
    import huggingface_hub

    def never(*a, **k):
        raise AssertionError("offline: the hub must not be contacted")

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    with pytest.raises(UserError, match=r"'gpt2' is not a local directory.*HF_HUB_OFFLINE=1"):
        hub_download("gpt2")


def test_hub_download_online_paths(monkeypatch, tmp_path):
    """Online, without a network: snapshot_download is replaced; its failures are UserErrors."""
    import huggingface_hub

    calls = []

    def fake(name, allow_patterns=None, **kw):
        calls.append((name, allow_patterns))
        return str(tmp_path)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub_download("org/name") == tmp_path
    assert calls == [("org/name", HUB_PATTERNS)]
    assert "model.safetensors" in HUB_PATTERNS and "tokenizer.json" in HUB_PATTERNS

    def fails(*a, **k):
        raise OSError("404 Client Error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fails)
    with pytest.raises(UserError, match=r"cannot download 'org/none' .*\(OSError\)"):
        hub_download("org/none")


def test_cli_hub_name_offline_exits_2(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("export", "--model", "hf:gpt2", "--out", tmp_path / "out")
    assert res.code == 2
    assert res.last_err.startswith("gpt2jax: error: 'gpt2' is not a local directory")


# ---------------------------------------------------------------- load_model


def test_load_model_hf_dir_matches_transformers(hf_lm_dir):
    from test_model import _torch_logits, forward

    path, torch_model = hf_lm_dir
    model, tok, source = load_model(str(path))
    assert source == Source("hf_dir", str(path))
    assert model.cfg.n_layer == torch_model.config.n_layer
    assert model.cfg.n_embd == torch_model.config.n_embd
    assert len(tok) == 50257
    ids = np.asarray([tok("Hello world, again")["input_ids"]])
    assert ids.tolist() == [[15496, 995, 11, 757]]
    got = forward(model, ids)
    want = _torch_logits(torch_model, ids)
    assert got.shape == want.shape == (1, 4, 50257)
    assert np.abs(got - want).max() <= 1e-4


def test_load_model_overrides_and_hub(hf_lm_dir, monkeypatch):
    import huggingface_hub

    path, _ = hf_lm_dir
    model, _, _ = load_model(f"hf:{path}", remat="full", embd_pdrop=0.0)
    assert (model.cfg.remat, model.cfg.embd_pdrop) == ("full", 0.0)
    # a hub name downloads into a directory, then loads as that directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: str(path))
    model, tok, source = load_model("org/tiny")
    assert source == Source("hub", "org/tiny")
    assert model.cfg.n_embd == 32 and tok.eos_token_id == 50256


def test_load_model_missing_source_fails_before_loading(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "none" / "x"))


# ---------------------------------------------------------------- tokenizer_for


def _cfg(tmp_path: Path, *overrides: str):
    from gpt2jax.config import load_config

    return load_config(None, ["--data.train=unused.txt",
                              f"--train.run_dir={tmp_path / 'run'}", *overrides])


def test_tokenizer_for_scratch_is_gpt2(tmp_path):
    tok = tokenizer_for(_cfg(tmp_path))
    assert len(tok) == 50257
    assert tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_tokenizer_for_init_dir_uses_its_tokenizer(tmp_path):
    import copy

    from gpt2jax.tokenizer import gpt2_tokenizer

    init = _hf_like_dir(tmp_path, "init")
    saved = copy.deepcopy(gpt2_tokenizer())
    saved.add_tokens(["<|init|>"], special_tokens=True)
    saved.save_pretrained(str(init))
    got = tokenizer_for(_cfg(tmp_path, f"--model.init={init}"))
    assert len(got) == 50258
    assert got.convert_tokens_to_ids("<|init|>") == 50257
    # hf: forcing, and an init dir without tokenizer files falls back to GPT-2
    bare = _hf_like_dir(tmp_path, "bare")
    assert len(tokenizer_for(_cfg(tmp_path, f"--model.init=hf:{bare}"))) == 50257


def test_tokenizer_for_init_run_uses_the_runs_tokenizer(tmp_path):
    import copy

    from gpt2jax.tokenizer import gpt2_tokenizer

    other = tmp_path / "other"
    other.mkdir()
    run = _run_dir(other, 2)
    tok = copy.deepcopy(gpt2_tokenizer())
    tok.add_tokens(["<|sep|>"], special_tokens=True)
    tok.save_pretrained(str(run / "tokenizer"))
    for init in (str(run), str(run / "checkpoints" / "2")):
        got = tokenizer_for(_cfg(tmp_path, f"--model.init={init}"))
        assert got.convert_tokens_to_ids("<|sep|>") == 50257, init


def test_tokenizer_for_existing_run_tokenizer_wins(tmp_path):
    import copy

    from gpt2jax.tokenizer import gpt2_tokenizer

    tok = copy.deepcopy(gpt2_tokenizer())
    tok.add_tokens(["<|pad|>"], special_tokens=True)
    tok.save_pretrained(str(tmp_path / "run" / "tokenizer"))
    cfg = _cfg(tmp_path, "--model.init=gpt2", '--data.add_special_tokens=["<|pad|>"]')
    # a tokenizer folder alone is not a run to resume: model.init decides (offline here)
    with pytest.raises(UserError, match="offline"):
        tokenizer_for(cfg)
    # model.init names a hub model: when resuming (model.json + checkpoints/), the run's
    # own tokenizer is used and nothing is downloaded
    (tmp_path / "run" / "model.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir()
    got = tokenizer_for(cfg)
    assert len(got) == 50258  # <|pad|> is not added a second time
    assert got.convert_tokens_to_ids("<|pad|>") == 50257


def test_tokenizer_for_hub_init_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="offline"):
        tokenizer_for(_cfg(tmp_path, "--model.init=gpt2"))


def test_tokenizer_for_adds_special_tokens(tmp_path):
    from gpt2jax.tokenizer import gpt2_tokenizer

    cfg = _cfg(tmp_path, '--data.add_special_tokens=["<|pad|>", "<|sep|>", "<|pad|>"]')
    tok = tokenizer_for(cfg)
    assert len(tok) == 50259
    pad, sep = tok.convert_tokens_to_ids(["<|pad|>", "<|sep|>"])
    assert (pad, sep) == (50257, 50258)
    assert tok("a<|sep|>b", add_special_tokens=False)["input_ids"] == [64, sep, 65]
    assert len(gpt2_tokenizer()) == 50257  # the shared offline tokenizer is untouched


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """'runs/dmeo' where runs/ exists is a missing directory (with the close sibling
    named), not a hub organisation; hf: still reaches the hub reading."""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"model source runs/dmeo does not exist \(did you mean "
                                        r"runs/demo\?\); check the path, or write hf:runs/dmeo"):
        resolve("runs/dmeo")
    assert resolve("hf:runs/dmeo") == Source("hub", "runs/dmeo")
    assert resolve("openai/gpt2x") == Source("hub", "openai/gpt2x")  # no openai/ here
