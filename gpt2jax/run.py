"""A run: its directory, its model config, its tokenizer, its first parameters.

RUN/ holds config.yaml (the resolved config), model.json (the resolved model config, every
automatic choice fixed), tokenizer/, checkpoints/ and the logs; `load_run` reads it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from .config import Config, save_config
from .errors import UserError
from .model import GPT2Config, resolve_auto

ARCH_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.model_json = self.path / "model.json"
        self.tokenizer_dir = self.path / "tokenizer"
        self._lock_fd: int | None = None

    @property
    def resume(self) -> bool:
        """Whether a previous `gpt2jax train` wrote this run (it may have no step yet)."""
        return self.model_json.is_file() and (self.path / "checkpoints").is_dir()

    def check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # a probe of its own: every process of a multi-process run checks the directory
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise UserError(f"train.run_dir={self.path} is not writable ({e.strerror}); "
                            "choose another directory") from e

    def lock(self) -> None:
        """Hold RUN/.lock until `unlock` or this process's end (an fcntl lock, dropped on any
        exit, even a kill); refuse while another process holds it, naming that process."""
        import fcntl
        import socket

        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path} is in use: {holder} is training it; wait for it "
                            "to end (or stop it), or choose another train.run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the lock; the file stays (a holder may reopen it)
            self._lock_fd = None

    def model_config(self) -> GPT2Config | None:
        """The model config recorded by the run (None before the first train)."""
        if not self.model_json.is_file():
            return None
        fields = json.loads(self.model_json.read_text())
        fields["labels"] = tuple(fields.get("labels") or ())
        return GPT2Config(**{k: v for k, v in fields.items()
                             if k in GPT2Config.__dataclass_fields__})

    def write(self, cfg: Config, mcfg: GPT2Config, tokenizer) -> None:
        """Record what the run trains with (process 0 only)."""
        save_config(cfg, self.path / "config.yaml")
        d = asdict(mcfg)
        d["labels"] = list(mcfg.labels)
        self.model_json.write_text(json.dumps(d, indent=2) + "\n")
        if not self.tokenizer_dir.is_dir():
            tokenizer.save_pretrained(str(self.tokenizer_dir))


def for_this_process(mcfg: GPT2Config) -> GPT2Config:
    """mcfg with its automatic choices fixed for this process's backend (and, on CPU, for
    whether glibc's huge-page malloc is on): the one place that reads the environment."""
    import jax

    from . import malloc
    from .sharding import has_cudnn

    platform = "cuda" if has_cudnn() else jax.default_backend()
    return resolve_auto(mcfg, platform, hugepages=malloc.active())


def tokenizer_for(cfg: Config):
    """The tokenizer a run of `cfg` trains with: the run's own when it resumes, else
    model.init's, else GPT-2's; plus data.add_special_tokens."""
    from .sources import source_tokenizer
    from .tokenizer import load_tokenizer

    run = RunDir(cfg.train.run_dir)
    if run.resume and run.tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(run.tokenizer_dir)
    else:
        scratch = cfg.model.init == "scratch"
        tokenizer = load_tokenizer(None) if scratch else source_tokenizer(cfg.model.init)
    if cfg.data.add_special_tokens:
        from .tasks import with_special_tokens

        tokenizer = with_special_tokens(tokenizer, cfg.data.add_special_tokens)
    return tokenizer


def model_config(cfg: Config, source: GPT2Config | None, labels: tuple[str, ...]) -> GPT2Config:
    """The model's config from the model section, the init source and the data's labels
    (automatic choices still open: see for_this_process)."""
    m = cfg.model
    explicit = {k: getattr(m, k) for k in ARCH_KEYS if getattr(m, k) is not None}
    if source is None:
        base = GPT2Config.from_preset(m.preset) if m.preset else GPT2Config()
        base = base.replace(**explicit)
    else:
        if m.preset:
            preset = GPT2Config.from_preset(m.preset)
            explicit = {**{k: getattr(preset, k) for k in ("n_layer", "n_embd", "n_head")},
                        **explicit}
        clash = {k: (v, getattr(source, k)) for k, v in explicit.items()
                 if getattr(source, k) != v}
        if clash:
            desc = ", ".join(f"model.{k}={a} but the source has {b}" for k, (a, b) in clash.items())
            raise UserError(f"model.init={m.init} fixes the architecture: {desc}; "
                            "remove these keys or use model.init=scratch")
        base = source
    fields = dict(head=m.head, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
                  classifier_dropout=m.classifier_dropout, attention=m.attention,
                  loss_chunk=m.loss_chunk, kernels=m.kernels)
    if m.dropout is not None:
        fields.update(embd_pdrop=m.dropout, attn_pdrop=m.dropout, resid_pdrop=m.dropout)
    fields.update(lora_fields(m.lora))
    if m.head != "lm":
        num = m.num_labels or len(labels)
        if labels and num != len(labels):
            raise UserError(f"model.num_labels={num} but the data has {len(labels)} labels "
                            f"{list(labels)}")
        fields.update(num_labels=num, labels=tuple(labels),
                      pad_token_id=base.eos_token_id)
    out = base.replace(**fields)
    if cfg.data.task != "classification" and cfg.train.seq_len > out.n_positions:
        raise UserError(f"train.seq_len={cfg.train.seq_len} exceeds the model's context "
                        f"n_positions={out.n_positions}; lower train.seq_len")
    return out


def lora_fields(lora) -> dict:
    """GPT2Config's LoRA fields from a model.lora section (None: no adapters)."""
    from .lora import resolve_targets

    if lora is None:
        return dict(lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, lora_targets=())
    return dict(lora_rank=lora.rank, lora_alpha=float(lora.alpha), lora_dropout=lora.dropout,
                lora_targets=resolve_targets(lora.targets))


def resolve_model_config(cfg: Config, source: GPT2Config | None, labels: tuple[str, ...],
                         vocab_needed: int, recorded: GPT2Config | None = None) -> GPT2Config:
    """The model config a run trains: from the config and the init `source`, or the run's
    own model.json (`recorded`) when it resumes; the vocabulary grown to the tokenizer's
    `vocab_needed` tokens for data.add_special_tokens; automatic choices fixed."""
    scratch = cfg.model.init == "scratch"
    if source is None and recorded is not None and not scratch:
        source = recorded.replace(head="lm")  # the run's weights, re-headed as configured
    mcfg = model_config(cfg, source, labels)
    grow = cfg.data.add_special_tokens and (source is not None or cfg.model.vocab_size is None)
    if grow and mcfg.vocab_size < vocab_needed:  # a source's new rows: see initial_params
        mcfg = mcfg.replace(vocab_size=vocab_needed)
    if recorded is not None and scratch:
        changed = {k: (getattr(recorded, k), getattr(mcfg, k)) for k in (*ARCH_KEYS, "head")
                   if getattr(recorded, k) != getattr(mcfg, k)}
        if changed:
            desc = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(f"{Path(cfg.train.run_dir)} holds a run with other model dimensions "
                            f"({desc}); resume with the same model settings or choose a new "
                            "train.run_dir")
    if mcfg.vocab_size < vocab_needed:
        raise UserError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_needed} tokens; raise model.vocab_size (GPT-2: 50257)")
    return for_this_process(mcfg)


def initial_params(mcfg: GPT2Config, seed: int, source_model, param_sh, adapter: str = ""):
    """Fresh parameters (seeded) on `param_sh`, overwritten by the source model's weights
    where it has them (a LoRA source merged first, new token rows grown), then by the PEFT
    `adapter` directory's adapters and saved modules; a new head keeps its fresh values."""
    import jax
    from flax import nnx

    from . import params as P
    from .model import create_model

    fresh = jax.jit(lambda: nnx.split(create_model(mcfg, seed))[1], out_shardings=param_sh)()
    if source_model is None:
        return fresh
    from .hf import read_adapter, to_flat_params
    from .lora import merge

    src = merge(source_model.cfg, to_flat_params(source_model))
    if adapter:
        src.update(_fitting(read_adapter(adapter, mcfg), P.flat(fresh),
                            mcfg.n_layer, adapter))
    if "wte" in src and src["wte"].shape[0] < mcfg.vocab_size:  # added special tokens
        from .tasks import grow_embedding

        src["wte"] = grow_embedding(src["wte"], mcfg.vocab_size)
    src = P.relayout(src, mcfg.n_layer, stacked=mcfg.scan_layers)
    shard = P.flat(param_sh)
    values = {name: jax.make_array_from_callback(src[name].shape, shard[name],
                                                 lambda idx, h=src[name]: h[idx])
              if name in src else arr for name, arr in P.flat(fresh).items()}
    return P.unflat(fresh, values)


def _fitting(values: dict, fresh: dict, n_layer: int, where: str) -> dict:
    """values (per-layer names), a UserError unless each fits a model parameter's shape."""
    from . import params as P

    want = {k: tuple(v.shape) for k, v in fresh.items()}
    if P.is_stacked(want):
        want = P.unstack(want, n_layer, take=lambda s, _: s[1:])
    for name, v in values.items():
        if want.get(name) != tuple(v.shape):
            shape = want.get(name, "no such parameter")
            raise UserError(f"{where}: {name} has shape {tuple(v.shape)} but the model has "
                            f"{shape}; use the adapter with the base it was trained on")
    return values


def load_model(src: str, step: int | str | None = None, **overrides):
    """(model, tokenizer, Source) for a SRC string (a run's Source names the step it read);
    overrides are GPT2Config fields that do not change weights (dtype, dropout, remat...)."""
    from . import hf
    from .sources import Source, hub_download, resolve
    from .tokenizer import load_tokenizer

    source = resolve(src, step)
    if source.kind in ("run", "checkpoint"):
        model, tokenizer, found = load_run(source.path, source.step, **overrides)
        return model, tokenizer, Source(source.kind, source.path, found)
    directory = hub_download(source.path) if source.kind == "hub" else source.path
    model = hf.load_hf_dir(directory, resolve=for_this_process, **overrides)
    return model, load_tokenizer(directory), source


def load_run(run_dir: str | Path, step: int | str | None = None, **overrides):
    """(model, tokenizer, step) of a gpt2jax run directory: latest, a step, or "best"."""
    from flax import nnx

    from .checkpoint import Checkpoints
    from .model import abstract_model
    from .sharding import has_cudnn
    from .tokenizer import load_tokenizer

    run = RunDir(run_dir)
    mcfg = run.model_config()
    if mcfg is None:
        raise UserError(f"{run.path} has no model.json; it was not written by gpt2jax train")
    if mcfg.attention == "cudnn" and "attention" not in overrides and not has_cudnn():
        mcfg = mcfg.replace(attention="explicit")  # trained on GPUs, read elsewhere: same maths
    mcfg = for_this_process(mcfg.replace(**overrides))
    ckpts = Checkpoints(run.path, read_only=True)
    step = _pick_step(ckpts, run.path, step)
    graphdef, template = nnx.split(abstract_model(mcfg))
    params, _, _ = ckpts.restore(step, template)
    ckpts.close()
    tokenizer = load_tokenizer(run.tokenizer_dir if run.tokenizer_dir.is_dir() else None)
    return nnx.merge(graphdef, params), tokenizer, step


def _pick_step(ckpts, run: Path, step: int | str | None) -> int:
    if step in (None, "latest", "best"):
        found = ckpts.best() if step == "best" else ckpts.latest()
        if found is None:
            raise UserError(f"{run} has no best checkpoint (no evaluation ran); use --step N"
                            if step == "best" else f"{run} has no committed checkpoint yet")
        return found
    if step not in ckpts.steps():
        raise UserError(f"{run} has no checkpoint at step {step}; it has {ckpts.steps()}")
    return int(step)

