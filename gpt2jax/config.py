"""Typed run configuration: dataclasses, YAML files, `--section.key=value` overrides.

OmegaConf structured configs do the parsing and type checking (unknown keys and wrong
types are rejected with the key's name); `validate` adds the range checks. Everything is
checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# The allowed choices, defined once: validation here, the model (model.py) and the CLI use them.
TASKS = ("lm", "text", "classification", "dictionary_forward", "dictionary_reverse", "conversation")
SCHEDULES = ("constant", "linear", "cosine")
HEADS = ("lm", "sequence", "attention_pool")
DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters stay float32
REMAT = ("none", "full", "dots")
# explicit: kernels.attention_core; xla, cudnn: jax.nn.dot_product_attention's (cudnn:
# NVIDIA GPUs, bf16); auto (here and in KERNELS): fixed per platform by model.resolve_auto
ATTENTION = ("auto", "explicit", "xla", "cudnn")
# the train step's kernels: kernels.py's custom VJPs, or the plain formulas beside them
KERNELS = ("auto", "custom", "plain")
# the model settings that take one of a few values (model.GPT2Config checks them too)
MODEL_CHOICES = {"head": HEADS, "dtype": DTYPES, "remat": REMAT, "attention": ATTENTION,
                 "kernels": KERNELS}
PROGRESS = ("auto", "bar", "lines", "none")
# LM blocks: documents joined and attending across their boundaries (concat), or each
# document its own segment: attention within it, positions from 0 (documents)
PACKING = ("concat", "documents")
# train.best_metric: the validation metrics of each task kind that can pick a best step
BEST_METRICS = {"lm": ("loss", "perplexity"), "classification": ("accuracy", "macro_f1")}

# model.lora.targets, named as PEFT matches GPT-2's modules (a name matches a module
# whose path equals it or ends with "." + it: "c_proj" adapts both projections)
LORA_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj")
# model.lora.train: parameters that train beside the adapters (the classifier head always)
LORA_TRAIN = ("layer_norm", "bias", "embeddings")


@dataclass
class LoraSection:
    """LoRA adapters on the named GPT-2 projections; the base weights stay frozen."""

    rank: int = 8
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: list[str] = field(default_factory=lambda: ["c_attn"])
    adapter: str = ""  # a PEFT adapter directory to start from (onto model.init)
    train: list[str] = field(default_factory=list)  # layer_norm | bias | embeddings


@dataclass
class ModelSection:
    init: str = "scratch"  # "scratch" or a model source (hf:gpt2, an HF dir, a run, a checkpoint)
    preset: str | None = None  # gpt2, gpt2-medium, gpt2-large, gpt2-xl
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_positions: int | None = None
    vocab_size: int | None = None
    dropout: float | None = None  # embd, attn and resid dropout together
    dtype: str = "float32"  # compute dtype; parameters stay float32
    head: str = "lm"  # lm | sequence | attention_pool
    num_labels: int | None = None  # default: the number of labels found in the data
    classifier_dropout: float = 0.1
    remat: str = "none"  # none | full | dots
    scan_layers: bool = False
    attention: str = "auto"  # auto | explicit | xla | cudnn (jax.nn.dot_product_attention)
    loss_chunk: int = -1  # LM loss in chunks of ~N tokens; 0: full logits; -1: auto by backend
    kernels: str = "auto"  # auto | custom | plain (KERNELS)
    lora: LoraSection | None = None  # LoRA fine-tuning (None: every parameter trains)


@dataclass
class DataSection:
    train: str = ""  # a local file/folder, hub:ORG/NAME[:CONFIG][@SPLIT], or gcide
    validation: str = ""  # empty: split from train by seed
    task: str = "lm"
    text_column: str = "text"
    label_column: str = "label"
    text_unit: str = "document"  # .txt files: document | line | paragraph
    validation_fraction: float = 0.05
    limit: int = 0  # use at most this many records (0 = all)
    labels: list[str] = field(default_factory=list)  # classification: fixed label order
    loss_on: str = "all"  # LM tasks: all | target (learn only the target part of a template)
    prompt_template: str = ""  # empty: the task's default (see gpt2jax/tasks.py)
    target_template: str = ""  # empty: the task's default
    example_template: str = " Example: {example}"  # dictionary_forward, records with an example
    truncation: str = "right"  # classification rows longer than seq_len: right | left
    add_special_tokens: list[str] = field(default_factory=list)  # e.g. ["<|pad|>"]
    cache_dir: str = ""  # tokenized-data cache; empty: $GPT2JAX_CACHE or ~/.cache/gpt2jax; off
    packing: str = "concat"  # LM blocks: concat | documents (PACKING)


@dataclass
class OptimSection:
    lr: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_lr: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_embeddings: bool = False
    clip_norm: float = 1.0  # 0 disables clipping
    freeze: list[str] = field(default_factory=list)  # regexes of parameter names kept fixed


@dataclass
class MeshSection:
    data: int = -1  # -1 fills the devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass
class DistSection:
    coordinator: str = ""  # host:port; empty = from env / SLURM / TPU, else single process
    num_processes: int = 0
    process_id: int = -1
    timeout: float = 60.0
    # seconds the other processes wait for process 0 to tokenize the data into the cache
    data_timeout: float = 3600.0
    local_device_count: int = 0


@dataclass
class EarlyStopSection:
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    min_delta: float = 0.0  # an improvement must beat the reference by more than this


@dataclass
class TrainSection:
    steps: int = 0  # 0: use epochs
    epochs: float = 1.0
    batch_size: int = 8  # global sequences per optimizer step
    grad_accum: int = 1
    seq_len: int = 128
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20  # validation batches per evaluation (0 = the whole split)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    best_metric: str = ""  # default: loss (lm) or accuracy (classification)
    early_stop: EarlyStopSection = field(default_factory=EarlyStopSection)
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_max_new_tokens: int = 32
    skip_nonfinite: int = 0  # skip up to N steps with a NaN/Inf loss before stopping
    progress: str = "auto"  # auto | bar | lines | none
    class_weights: str = "none"  # classification: none | balanced (inverse class frequency)
    lm_loss_weight: float = 0.0  # classification: + lambda * LM loss on the real tokens


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    dist: DistSection = field(default_factory=DistSection)
    train: TrainSection = field(default_factory=TrainSection)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config and apply `--section.key=value` overrides; validate everything."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist; see configs/ for examples")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p} is not valid YAML: {_one_line(e)}") from e
        if not isinstance(loaded, dict):
            raise UserError(f"{p} must hold a mapping of sections (model:, data:, train: ...)")
        layers.append((str(p), OmegaConf.create(loaded)))
    dotlist = [item[2:] if item.startswith("--") else item for item in overrides]
    for item, key in zip(overrides, dotlist):
        if "=" not in key:
            raise UserError(f"override {item!r} must look like --section.key=value")
    for key in dotlist:  # one at a time, so the error names the override at fault
        try:
            layers.append(("the command line", OmegaConf.from_dotlist([key])))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise UserError(
                f"bad override --{key}: {_one_line(e)} (values are YAML: quote strings "
                "with backslashes in single quotes, e.g. --optim.freeze=\"['^h\\.0\\.']\")"
            ) from e
    merged = base
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise UserError(f"{where}: key {key}: {_omega_reason(e, key)}") from e
    cfg: Config = OmegaConf.to_object(merged)
    if cfg.data.cache_dir == "False":  # YAML reads `off` as false, which a str field spells so
        cfg.data.cache_dir = "off"
    validate(cfg)
    return cfg


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# names people bring from other trainers
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps":
           "grad_accum", "max_grad_norm": "clip_norm", "warmup": "warmup_steps",
           "output_dir": "run_dir", "model_name_or_path": "init"}


def _omega_reason(e: Exception, key: str) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "not in" in msg or "Key" in type(e).__name__:
        return f"unknown key{_suggestion(key)}; the keys are listed in README's Configs section"
    return msg


def _suggestion(key: str) -> str:
    """ ' (did you mean optim.lr?)' for a mistyped or foreign key, else ''."""
    import difflib

    section, _, name = key.rpartition(".")
    sections = {f.name: f.type for f in dataclasses.fields(Config)} | {"model.lora": "LoraSection"}
    if section not in sections:
        close = difflib.get_close_matches(section or name, sections, n=1)
        return f" (did you mean {close[0]}?)" if close else ""
    fields = [f.name for f in dataclasses.fields(globals()[sections[section]])]
    close = [ALIASES[name]] if ALIASES.get(name) in fields else \
        difflib.get_close_matches(name, fields, n=1)
    return f" (did you mean {section}.{close[0]}?)" if close else ""


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Range checks that types cannot express. Raises UserError naming the key."""
    m, d, o, t, mesh = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.mesh
    need = _need
    choices = {"optim.schedule": SCHEDULES, "train.progress": PROGRESS, "data.task": TASKS,
               **{f"model.{k}": v for k, v in MODEL_CHOICES.items()}}
    for key, allowed in choices.items():
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) in allowed, key,
             f"choose one of {', '.join(allowed)}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.end_lr >= 0, "optim.end_lr", f"must be >= 0, got {o.end_lr}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", "must be in [0, 1)")
    for pattern in o.freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"optim.freeze: {pattern!r} is not a regular expression ({e})") from e
    need(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    need(t.steps > 0 or t.epochs > 0, "train.epochs", "must be > 0 when train.steps is 0")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.batch_size % t.grad_accum == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    need(t.seq_len >= 2, "train.seq_len", "must be >= 2")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        need(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 disables)")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(bool(d.train), "data.train", "is required: a file, folder, hub:ORG/NAME or gcide")
    need(0 <= d.validation_fraction < 1, "data.validation_fraction", "must be in [0, 1)")
    need(d.text_unit in ("document", "line", "paragraph"), "data.text_unit",
         "choose document, line or paragraph")
    need(d.loss_on in ("all", "target"), "data.loss_on", "choose all or target")
    need(d.truncation in ("right", "left"), "data.truncation", "choose right or left")
    need(t.class_weights in ("none", "balanced"), "train.class_weights",
         "choose none or balanced")
    need(t.lm_loss_weight >= 0, "train.lm_loss_weight", "must be >= 0")
    if m.dropout is not None:
        need(0 <= m.dropout < 1, "model.dropout", "must be in [0, 1)")
    need(m.attention != "cudnn" or m.dtype != "float32", "model.attention",
         "cudnn needs model.dtype=bfloat16 (cuDNN flash attention has no float32 kernel)")
    # checked here, before any data work; None would mean the model's own 0.1
    need(m.attention in ("auto", "explicit") or m.dropout == 0, "model.attention",
         f"{m.attention} has no attention dropout (jax.nn.dot_product_attention takes none) "
         f"but model.dropout is {m.dropout if m.dropout is not None else 'unset (0.1)'}; "
         "set model.dropout=0 or use model.attention=explicit")
    need(m.loss_chunk >= -1, "model.loss_chunk", "must be -1 (auto), 0 (full logits) or a "
         f"token count, got {m.loss_chunk}")
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "num_labels"):
        v = getattr(m, key)
        need(v is None or v >= 1, f"model.{key}", f"must be >= 1, got {v}")
    classification = d.task == "classification"
    need(classification == (m.head != "lm"), "model.head",
         f"head {m.head!r} does not fit data.task={d.task!r}: use head lm for language-model "
         "tasks and sequence or attention_pool for classification")
    for key in ("data", "fsdp", "tensor"):
        v = getattr(mesh, key)
        need(v == -1 or v >= 1, f"mesh.{key}", f"must be >= 1 or -1 (fill), got {v}")
    need([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, "mesh",
         "at most one of mesh.data/fsdp/tensor may be -1")
    if m.lora is not None:
        _validate_lora(m, d, need)
    need(cfg.dist.timeout > 0, "dist.timeout", "must be > 0 seconds")
    need(cfg.dist.data_timeout > 0, "dist.data_timeout", "must be > 0 seconds")
    _validate_packing_and_early_stop(cfg)


def check_packing_attention(packing: str, attention: str, resolved: bool = False) -> None:
    """Refuse document packing with cuDNN attention: unverified that gpt2jax's segment
    mask reaches cuDNN's kernel intact, so refuse rather than risk documents attending to
    each other. Called on the config, and again on the resolved model config (`resolved`),
    where model.attention=auto may have become cudnn."""
    if packing == "documents" and attention == "cudnn":
        how = "model.attention=auto resolved to cudnn on this GPU" if resolved else \
            "model.attention=cudnn"
        raise UserError(f"data.packing: documents is not supported with {how}; set "
                        "model.attention=explicit or xla, or data.packing=concat")


def _validate_packing_and_early_stop(cfg: Config) -> None:
    d, t, es = cfg.data, cfg.train, cfg.train.early_stop
    _need(d.packing in PACKING, "data.packing", f"choose one of {', '.join(PACKING)}")
    check_packing_attention(d.packing, cfg.model.attention)
    kind = "classification" if d.task == "classification" else "lm"
    _need(not t.best_metric or t.best_metric in BEST_METRICS[kind], "train.best_metric",
          f"choose one of {', '.join(BEST_METRICS[kind])} for data.task={d.task}")
    _need(es.patience >= 0, "train.early_stop.patience", "must be >= 0 (0 disables)")
    _need(es.min_delta >= 0, "train.early_stop.min_delta", f"must be >= 0, got {es.min_delta}")
    _need(not es.patience or t.eval_every > 0, "train.early_stop.patience",
          "needs evaluations: set train.eval_every > 0")


def _validate_lora(m: ModelSection, d: DataSection, need) -> None:
    lo = m.lora
    need(lo.rank >= 1, "model.lora.rank", f"must be >= 1, got {lo.rank}")
    need(lo.alpha > 0, "model.lora.alpha", f"must be > 0, got {lo.alpha}")
    need(0 <= lo.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    need(bool(lo.targets), "model.lora.targets", f"name at least one of {', '.join(LORA_TARGETS)}")
    for t in lo.targets:
        need(t in LORA_TARGETS, "model.lora.targets",
             f"{t!r} is not a GPT-2 projection; choose from {', '.join(LORA_TARGETS)}")
    for g in lo.train:
        need(g in LORA_TRAIN, "model.lora.train", f"{g!r}: choose from {', '.join(LORA_TRAIN)}")
    need(not lo.adapter or m.init != "scratch", "model.lora.adapter",
         "an adapter is trained on a base model: set model.init to that base")
    need(not d.add_special_tokens or "embeddings" in lo.train, "model.lora.train",
         "data.add_special_tokens adds rows to wte that would stay random while only the "
         "adapters train: add embeddings (--model.lora.train=[embeddings])")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what `gpt2jax train` ran with)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def read_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run directory was trained with."""
    return load_config(Path(run_dir) / "config.yaml")
