"""Config loading: YAML + overrides, and every bad input rejected with the key's name.

Every error case runs the real `gpt2jax train` command in-process and stops before any
model is built (exit status 2, last stderr line `gpt2jax: error: ...`).
"""

from __future__ import annotations

import pytest
import yaml
from test_checkpoint import private_data_cache  # noqa: F401 (autouse fixture)

from gpt2jax.config import Config, load_config
from gpt2jax.errors import UserError

BASE = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "dropout": 0.0},
    "data": {"train": "PLACEHOLDER", "task": "lm"},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
    "train": {"steps": 4, "batch_size": 8, "seq_len": 16, "progress": "none"},
}


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "text.txt").write_text("A small text about the weather and the sea. " * 40)
    cfg = {**BASE, "data": {**BASE["data"], "train": str(d / "text.txt")},
           "train": {**BASE["train"], "run_dir": str(d / "run")}}
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_yaml_and_overrides_are_typed_and_merged(cfg_file):
    cfg = load_config(cfg_file, ["--optim.lr=3e-4", "--mesh.fsdp=2", "--train.steps=7",
                                 "--optim.freeze=[wte,wpe]", "--model.scan_layers=true"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.mesh.fsdp == 2 and cfg.train.steps == 7 and cfg.model.scan_layers is True
    assert cfg.optim.freeze == ["wte", "wpe"]
    assert cfg.model.n_embd == 32 and cfg.train.seq_len == 16  # from the YAML file
    assert cfg.optim.schedule == "cosine" and cfg.mesh.data == -1  # defaults


BAD = [
    # (overrides, text the error must contain)
    (["--optim.bogus=1"], "optim.bogus"),
    (["--trian.steps=3"], "trian"),
    (["--train.steps=abc"], "train.steps"),
    (["--model.n_layer=2.5"], "model.n_layer"),
    (["--optim.lr=0"], "optim.lr"),
    (["--optim.lr=-1e-3"], "optim.lr"),
    (["--train.steps=-1"], "train.steps"),
    (["--train.batch_size=6", "--train.grad_accum=4"], "train.grad_accum"),
    (["--optim.schedule=exponential"], "optim.schedule"),
    (["--optim.freeze=[(unclosed]"], "optim.freeze"),
    (["--model.head=sequence"], "model.head"),
    (["--mesh.fsdp=0"], "mesh.fsdp"),
    (["--mesh.data=3"], "mesh"),  # 3 x 1 x 1 devices, but there are 8
    (["--mesh.data=-1", "--mesh.fsdp=-1"], "mesh"),
    (["--mesh.data=2", "--mesh.tensor=3"], "mesh"),
    (["--mesh.data=1", "--mesh.fsdp=8", "--train.batch_size=4"], "train.batch_size"),
    (["--train.seq_len=100"], "train.seq_len"),  # longer than n_positions=64
    (["--train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["--train.steps"], "--section.key=value"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_exit_2_naming_the_key(cli, cfg_file, overrides, needle):
    res = cli("train", cfg_file, *overrides)
    assert res.code == 2, res.err
    assert res.last_err.startswith("gpt2jax: error:"), res.err
    assert needle in res.last_err
    assert "Traceback" not in res.err


def test_missing_file_and_yaml_syntax_error(cli, tmp_path):
    res = cli("train", tmp_path / "nope.yaml")
    assert res.code == 2 and "nope.yaml" in res.last_err and "does not exist" in res.last_err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  n_layer: [2\ntrain: {steps: 1}\n")
    res = cli("train", broken)
    assert res.code == 2 and "broken.yaml" in res.last_err and "YAML" in res.last_err
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    res = cli("train", listed)
    assert res.code == 2 and "mapping" in res.last_err


def test_bad_key_inside_the_file_names_file_and_key(tmp_path, cfg_file):
    bad = yaml.safe_load(cfg_file.read_text())
    bad["train"]["batchsize"] = 4
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"typo\.yaml.*train\.batchsize"):
        load_config(path)


def test_cache_dir_off_survives_yaml_booleans(tmp_path, cfg_file):
    # YAML 1.1 reads `off` as false; data.cache_dir=off must still turn the cache off
    assert load_config(cfg_file, ["--data.cache_dir=off"]).data.cache_dir == "off"
    raw = yaml.safe_load(cfg_file.read_text())
    raw["data"]["cache_dir"] = "OFF_MARK"
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump(raw).replace("OFF_MARK", "off"))  # unquoted, as users write
    assert load_config(path).data.cache_dir == "off"
    assert load_config(cfg_file, ["--data.cache_dir=/tmp/c"]).data.cache_dir == "/tmp/c"
