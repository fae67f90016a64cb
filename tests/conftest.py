"""Test setup: 8 fake CPU devices and an offline hub, set before anything imports jax."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu is installed for the compile tests: keep every test's JAX on the CPU backend (as
# the gpt2jax command does, compile.cpu_unless_tpu); compiles load libtpu by themselves
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiling dominates this suite's time on CPU: JAX's switch for programs run once skips
# LLVM's expensive passes (IEEE arithmetic either way; subprocesses inherit it). The
# shipped commands compile fully; test_compile.py turns it off for libtpu's figures.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Tokenized-data cache of this test session only (never the user's ~/.cache).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["GPT2JAX_CACHE"] = tempfile.mkdtemp(prefix="gpt2jax-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPT2JAX_CACHE"], ignore_errors=True)

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A tiny GPT-2 with the real vocabulary (so the real tokenizer works) and small widths.
TINY = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def json(self):
        import json

        return json.loads(self.out)

    @property
    def last_err(self) -> str:
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def json_per_process(stdout: str, first_key: str) -> dict[int, dict]:
    """{process id: JSON object} from launch/local.sh's "[i] ..." lines: the object that
    starts with `{"first_key"`. Decoded where it starts: gloo's threads write "[Gloo] Rank
    ..." to the same stdout a fragment at a time, so a fragment may share its line."""
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"\[(\d+)\] ", line)
        at = line.find(f'{{"{first_key}"')
        if m and at >= 0:
            found[int(m.group(1))] = json.JSONDecoder().raw_decode(line, at)[0]
    return found


def run_cli(*argv: str) -> CliResult:
    """Run `gpt2jax ARGV` in-process and capture its exit status and output."""
    from gpt2jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli():
    return run_cli


def save_hf_model(path: Path, *, seed: int = 0, head: str = "lm", tokenizer: bool = True, **cfg):
    """Build a random transformers GPT-2 (torch) and save it with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    conf = GPT2Config(**{**TINY, **cfg})
    cls = GPT2ForSequenceClassification if head == "sequence" else GPT2LMHeadModel
    model = cls(conf).eval()
    model.save_pretrained(str(path))
    if tokenizer:
        from gpt2jax.tokenizer import gpt2_tokenizer

        gpt2_tokenizer().save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def hf_lm_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved to disk with the GPT-2 tokenizer: (path, torch model)."""
    path = tmp_path_factory.mktemp("hf_lm")
    return path, save_hf_model(path)


@pytest.fixture(scope="session")
def hf_cls_dir(tmp_path_factory):
    """A tiny random GPT2ForSequenceClassification (3 labels, pad = eos): (path, torch model)."""
    path = tmp_path_factory.mktemp("hf_cls")
    model = save_hf_model(
        path, seed=1, head="sequence", num_labels=3, pad_token_id=50256,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    return path, model
