"""LoRA: the adapters' shapes, initialisation and term, which parameters train, PEFT's
names and layouts, and merging adapters into the kernels (README, "LoRA fine-tuning").
Adapters are ordinary parameters ("h.3.attn.c_attn_lora_a" / "_lora_b"); neither torch
nor peft is imported, and hf.py reads and writes the adapter directories.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .errors import UserError

# the adaptable projections, as (module path inside a block) in PEFT's module naming
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# target_modules for adapter_config.json: the shortest names PEFT matches exactly
_PEFT_NAMES = {"attn.c_attn": "c_attn", "mlp.c_fc": "c_fc"}


def resolve_targets(names) -> tuple[str, ...]:
    """The modules (MODULES order) that target names match, as PEFT matches them: equal, or
    ending with "." + name."""
    return tuple(m for m in MODULES if any(m == n or m.endswith("." + n) for n in names))


def param_shapes(cfg, module: str) -> tuple[tuple, tuple, tuple, tuple]:
    """(A shape, A axes, B shape, B axes) in our layout, split like the kernel they adapt
    (model.py) so tensor parallelism splits an adapter's output as it splits the kernel."""
    d, f, h, k, r = cfg.n_embd, cfg.inner, cfg.n_head, cfg.head_dim, cfg.lora_rank
    return {
        "attn.c_attn": ((d, r), ("embed", "lora"), (r, 3, h, k), ("lora", "qkv", "heads",
                                                                    "head_dim")),
        "attn.c_proj": ((h, k, r), ("heads", "head_dim", "lora"), (r, d), ("lora", "embed")),
        "mlp.c_fc": ((d, r), ("embed", "lora"), (r, f), ("lora", "mlp")),
        "mlp.c_proj": ((f, r), ("mlp", "lora"), (r, d), ("lora", "embed")),
    }[module]


def make_params(cfg, module: str, rngs) -> dict:
    """{"{leaf}_lora_a": Param, "{leaf}_lora_b": Param} for an adapted module (empty when
    it is not adapted); A as PEFT initialises it (kaiming_uniform(a=sqrt(5)) = uniform
    +-1/sqrt(in)), B zero."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if module not in cfg.lora_targets:
        return {}
    a_shape, a_axes, b_shape, b_axes = param_shapes(cfg, module)
    bound = 1.0 / np.sqrt(math.prod(a_shape[:-1]))
    a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
    leaf = module.split(".")[1]
    return {f"{leaf}_lora_a": nnx.Param(a, out_sharding=a_axes),
            f"{leaf}_lora_b": nnx.Param(jnp.zeros(b_shape, jnp.float32), out_sharding=b_axes)}


def term(x, a, b, scale: float):
    """scale * (x @ A) @ B: an adapter's addition to a projection of x (..., in), shaped
    (..., *B's output axes), in x's dtype."""
    r = a.shape[-1]
    y = (x @ a.reshape(-1, r).astype(x.dtype)) @ b.reshape(r, -1).astype(x.dtype)
    return (y * scale).astype(x.dtype).reshape(*x.shape[:-1], *b.shape[1:])


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's."""
    return "_lora_" in name


def trainable(name: str, groups) -> bool:
    """Whether a parameter trains under model.lora: the adapters, the classifier heads,
    and the model.lora.train groups (layer_norm: ln_1/ln_2/ln_f; bias: every bias, as
    PEFT's bias="all"; embeddings: wte and wpe)."""
    leaf = name.rsplit(".", 1)[-1]
    return (is_adapter(name) or name.startswith(("score.", "pool."))
            or ("layer_norm" in groups and re.search(r"(^|\.)ln_(1|2|f)\.", name) is not None)
            or ("bias" in groups and leaf.endswith("bias"))
            or ("embeddings" in groups and name in ("wte", "wpe")))


# ---------------------------------------------------------------- flat dicts


def _pairs(cfg):
    """(layer, module, our A name, our B name) of every adapter, per-layer names."""
    for i in range(cfg.n_layer):
        for m in cfg.lora_targets:
            yield i, m, f"h.{i}.{m}_lora_a", f"h.{i}.{m}_lora_b"


def merge(cfg, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-layer flat parameters with every adapter folded into its kernel (W + scale * A
    B) and the adapter entries dropped; unchanged without LoRA."""
    if not getattr(cfg, "lora_rank", 0):
        return flat
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    r = cfg.lora_rank
    for _, _, a, b in _pairs(cfg):
        kernel = f"{a.removesuffix('_lora_a')}_kernel"
        w = np.asarray(out[kernel], np.float32)
        delta = np.asarray(flat[a], np.float32).reshape(-1, r) @ \
            np.asarray(flat[b], np.float32).reshape(r, -1)
        out[kernel] = w + (cfg.lora_scale * delta).reshape(w.shape).astype(np.float32)
    return out


def to_peft(cfg, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adapter tensors under PEFT's names and layouts: A (r, in), B (out, r)."""
    out, r = {}, cfg.lora_rank
    for i, m, a, b in _pairs(cfg):
        key = f"{PREFIX}transformer.h.{i}.{m}"
        out[f"{key}.lora_A.weight"] = np.asarray(flat[a], np.float32).reshape(-1, r).T
        out[f"{key}.lora_B.weight"] = np.asarray(flat[b], np.float32).reshape(r, -1).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_peft(cfg, tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Our adapter entries (per-layer names) from PEFT-named tensors (with PREFIX); every
    tensor must be there with the shape the base implies, and none may be left over."""
    tensors = dict(tensors)
    out, r = {}, cfg.lora_rank
    for i, m, a, b in _pairs(cfg):
        a_shape, _, b_shape, _ = param_shapes(cfg, m)
        for ours, theirs, shape, want in (
                (a, "lora_A", (r, math.prod(a_shape[:-1])), a_shape),
                (b, "lora_B", (math.prod(b_shape[1:]), r), b_shape)):
            name = f"{PREFIX}transformer.h.{i}.{m}.{theirs}.weight"
            if name not in tensors:
                raise UserError(f"{where} has no tensor {name}; the adapter does not fit a "
                                f"{cfg.n_layer}-layer base with targets {list(cfg.lora_targets)}")
            arr = np.asarray(tensors.pop(name), np.float32)
            if arr.shape != shape:
                raise UserError(f"{where}: {name} has shape {arr.shape} but the base model "
                                f"(model.init) implies {shape}; use the adapter's own base")
            out[ours] = arr.T.reshape(want)
    left = sorted(k for k in tensors if "lora_" in k)
    if left:
        raise UserError(f"{where} holds adapters the base has no place for ({left[0]}, "
                        f"{len(left)} in all); use the adapter's own base model")
    return out


# ---------------------------------------------------------------- adapter_config.json


def adapter_config(cfg, groups, base: str) -> dict:
    """PEFT's adapter_config.json for this model's adapters; refuses what PEFT cannot
    attach to the base model's transformers class."""
    if cfg.head == "attention_pool":
        raise UserError("the attention_pool head has no transformers class, so PEFT cannot "
                        "load an adapter for it; export the merged model with "
                        "`gpt2jax export --backbone-only` instead")
    if "embeddings" in groups:
        raise UserError("this run trained the token embeddings (model.lora.train has "
                        "embeddings), which PEFT cannot attach to a base of another "
                        "vocabulary; export the merged model (without --adapter) instead")
    # model.lora.train groups as PEFT saves them: layer_norm as modules_to_save, bias as bias="all"
    saved = ["ln_1", "ln_2", "ln_f"] if "layer_norm" in groups else []
    if cfg.head == "sequence":
        saved.append("score")
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if cfg.head == "sequence" else "CAUSAL_LM",
        "base_model_name_or_path": base, "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": [_PEFT_NAMES.get(m, m) for m in cfg.lora_targets],
        "fan_in_fan_out": True, "bias": "all" if "bias" in groups else "none",
        "modules_to_save": saved or None, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def read_config(directory: str | Path, cfg) -> dict:
    """adapter_config.json of a PEFT LoRA adapter directory, checked for what gpt2jax can
    load (plain LoRA: no DoRA, rsLoRA, per-layer ranks or layer subsets) and for r,
    lora_alpha and targets equal to cfg's (a GPT2Config, or run.lora_fields' dict)."""
    d = Path(directory)
    path = d / CONFIG_FILE
    if not path.is_file() or not (d / WEIGHTS_FILE).is_file():
        raise UserError(f"model.lora.adapter={d}: expected a PEFT adapter directory with "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE} (save_pretrained of a PeftModel)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    kind = hf.get("peft_type") if isinstance(hf, dict) else None
    if kind != "LORA":
        raise UserError(f"{path}: peft_type is {kind!r}; gpt2jax loads LoRA adapters only")
    for key in ("use_dora", "use_rslora", "layers_to_transform", "rank_pattern",
                "alpha_pattern"):
        if hf.get(key):
            raise UserError(f"{path}: {key}={hf[key]!r} is not supported (plain LoRA only)")
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    theirs = (hf.get("r"), float(hf.get("lora_alpha", 0)), _targets(hf, str(path)))
    ours = (get("lora_rank"), float(get("lora_alpha")), tuple(get("lora_targets")))
    for what, a, b, key in zip(("r", "lora_alpha", "targets"), theirs, ours,
                               ("rank", "alpha", "targets"), strict=True):
        if a != b:
            raise UserError(f"{path} has {what}={a!r} but model.lora.{key} gives {b!r}; "
                            f"set model.lora.{key} to the adapter's value")
    return hf


def _targets(hf: dict, where: str) -> tuple[str, ...]:
    """The modules an adapter's target_modules match (a list by suffix, a string as a
    regular expression over the full module names, as PEFT reads them)."""
    t = hf.get("target_modules")
    if isinstance(t, str):
        return tuple(m for m in MODULES if re.fullmatch(t, f"transformer.h.0.{m}"))
    if not isinstance(t, list):
        raise UserError(f"{where}: target_modules must be a list or a regular expression")
    return resolve_targets(t)
