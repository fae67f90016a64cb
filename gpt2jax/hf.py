"""GPT-2 <-> Hugging Face transformers: config fields, weight names and layouts, export.

Every tensor maps by a reshape (HF's Conv1D stores (in, out), like our kernels), except
the classifier `score`, an nn.Linear stored (out, in). Conversion reads and writes
safetensors with numpy: torch is never needed (a pytorch_model.bin is read only when
torch is installed, with weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import lora
from .errors import UserError
from .model import ACTIVATIONS, GPT2, GPT2Config, from_values

# (HF name, our path) inside a block, a module's weight and bias per line
BLOCK_MAP = (
    ("ln_1.weight", "ln_1.scale"), ("ln_1.bias", "ln_1.bias"),
    ("attn.c_attn.weight", "attn.c_attn_kernel"), ("attn.c_attn.bias", "attn.c_attn_bias"),
    ("attn.c_proj.weight", "attn.c_proj_kernel"), ("attn.c_proj.bias", "attn.c_proj_bias"),
    ("ln_2.weight", "ln_2.scale"), ("ln_2.bias", "ln_2.bias"),
    ("mlp.c_fc.weight", "mlp.c_fc_kernel"), ("mlp.c_fc.bias", "mlp.c_fc_bias"),
    ("mlp.c_proj.weight", "mlp.c_proj_kernel"), ("mlp.c_proj.bias", "mlp.c_proj_bias"),
)
TOP_MAP = (("wte.weight", "wte"), ("wpe.weight", "wpe"),
           ("ln_f.weight", "ln_f.scale"), ("ln_f.bias", "ln_f.bias"))
# config.json keys that are GPT2Config fields of the same name, with transformers' defaults
HF_FIELDS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "initializer_range": 0.02,
}
ARCHITECTURES = {"lm": "GPT2LMHeadModel", "sequence": "GPT2ForSequenceClassification"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ---------------------------------------------------------------- names


def name_pairs(cfg: GPT2Config) -> Iterator[tuple[str, str]]:
    """(HF state-dict name, our flat parameter path) for every tensor of the model; our
    block paths are per layer ("h.3.attn.c_attn_kernel") whatever the layout."""
    for hf_name, ours in TOP_MAP:
        yield f"transformer.{hf_name}", ours
    for i in range(cfg.n_layer):
        for hf_name, ours in BLOCK_MAP:
            yield f"transformer.h.{i}.{hf_name}", f"h.{i}.{ours}"
    if cfg.head == "sequence":
        yield "score.weight", "score.kernel"


def to_flat_params(model: GPT2) -> dict[str, np.ndarray]:
    """Our parameters as {"h.0.attn.c_attn_kernel": array}, layers always unstacked."""
    from flax import nnx

    from . import params as P

    values = {k: np.asarray(v) for k, v in P.flat(nnx.state(model, nnx.Param)).items()}
    return P.relayout(values, model.cfg.n_layer, stacked=False)


def to_hf_tensors(model: GPT2) -> dict[str, np.ndarray]:
    """The model's weights under transformers' GPT-2 names and layouts (float32)."""
    ours = lora.merge(model.cfg, to_flat_params(model))  # adapters folded into the kernels
    return {hf_name: _to_hf(model.cfg, hf_name, path, ours[path])
            for hf_name, path in name_pairs(model.cfg)}


def _to_hf(cfg: GPT2Config, hf_name: str, path: str, arr: np.ndarray) -> np.ndarray:
    """One of our tensors in HF's layout: the classifier transposed, the rest reshaped."""
    arr = arr.T if path == "score.kernel" else arr.reshape(_hf_shape(cfg, hf_name))
    return np.ascontiguousarray(arr, dtype=np.float32)


def _from_hf(cfg: GPT2Config, path: str, arr: np.ndarray) -> np.ndarray:
    """An HF tensor of the right shape in our layout: attention's heads split out, the
    classifier transposed."""
    d, h, k = cfg.n_embd, cfg.n_head, cfg.head_dim
    split = {"attn.c_attn_kernel": (d, 3, h, k), "attn.c_attn_bias": (3, h, k),
             "attn.c_proj_kernel": (h, k, d)}
    if path == "score.kernel":
        return arr.T
    return arr.reshape(next((s for end, s in split.items() if path.endswith(end)), arr.shape))


def _hf_shape(cfg: GPT2Config, hf_name: str) -> tuple[int, ...]:
    d, f = cfg.n_embd, cfg.inner
    shapes = {
        "wte.weight": (cfg.vocab_size, d),
        "wpe.weight": (cfg.n_positions, d),
        "c_attn.weight": (d, 3 * d),
        "c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "c_fc.weight": (d, f),
        "c_fc.bias": (f,),
        "mlp.c_proj.weight": (f, d),
        "score.weight": (cfg.num_labels, d),
    }
    # the rest, (d,): LayerNorm weights and the d-wide biases
    return next((s for end, s in shapes.items() if hf_name.endswith(end)), (d,))


def from_hf_tensors(cfg: GPT2Config, tensors: dict[str, np.ndarray], where: str = "") -> GPT2:
    """Build our model from HF-named tensors (prefix `transformer.` optional)."""
    tensors = {_canonical(k): v for k, v in tensors.items()}
    flat = {}
    for hf_name, path in name_pairs(cfg):
        if hf_name not in tensors:
            bare = hf_name.removeprefix("transformer.")
            raise UserError(
                f"{where or 'the weights'} have no tensor {bare!r} that config.json implies "
                f"(n_layer={cfg.n_layer}, head={cfg.head}); the weights and config.json "
                "do not belong together"
            )
        arr = np.asarray(tensors[hf_name], dtype=np.float32)
        want = _hf_shape(cfg, hf_name)
        if tuple(arr.shape) != want:
            raise UserError(
                f"{where or 'the weights'}: tensor {hf_name!r} has shape {tuple(arr.shape)} "
                f"but config.json implies {want}; fix config.json or use matching weights"
            )
        flat[path] = _from_hf(cfg, path, arr)
    _check_tied(tensors, where)
    return from_values(cfg, flat)


def _canonical(name: str) -> str:
    return "transformer." + name if name.startswith(("h.", "wte.", "wpe.", "ln_f.")) else name


def _check_tied(tensors: dict[str, np.ndarray], where: str) -> None:
    head = tensors.get("lm_head.weight")
    wte = tensors.get("transformer.wte.weight")
    if head is not None and wte is not None and head.shape == wte.shape:
        if not np.array_equal(np.asarray(head, np.float32), np.asarray(wte, np.float32)):
            raise UserError(f"{where}: lm_head.weight differs from wte.weight (an untied LM head); "
                            "GPT-2 ties them and gpt2jax supports only tied heads")


# ---------------------------------------------------------------- config


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> GPT2Config:
    """GPT2Config from a transformers config.json dict; refuses what GPT-2 never uses."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{where}: model_type is {model_type!r}; gpt2jax loads only GPT-2 models")
    if hf.get("add_cross_attention"):
        raise UserError(
            f"{where}: add_cross_attention=true (an encoder-decoder GPT-2) is not supported"
        )
    fields = {k: hf.get(k, default) for k, default in HF_FIELDS.items()}
    act = fields["activation_function"]
    if act not in ACTIVATIONS:
        raise UserError(f"{where}: activation_function={act!r} is not supported "
                        f"(supported: {', '.join(ACTIVATIONS)}); fix config.json")
    if hf.get("tie_word_embeddings") is False:
        raise UserError(f"{where}: tie_word_embeddings=false; GPT-2's LM head is always tied")
    head = "sequence" if "GPT2ForSequenceClassification" in (hf.get("architectures") or []) \
        else "lm"
    id2label = hf.get("id2label") or {}
    labels = tuple(id2label[k] for k in sorted(id2label, key=int)) if id2label else ()
    fields.update(
        head=head,
        num_labels=len(labels) if labels else hf.get("num_labels", 2),
        labels=labels if head != "lm" else (),
        pad_token_id=hf.get("pad_token_id"),
        eos_token_id=_first(hf.get("eos_token_id"), 50256),
    )
    whole = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "num_labels")
    for k, v in fields.items():
        if k in whole and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise UserError(f"{where}: {k}={v!r} must be a whole number; fix config.json")
        if k in ("n_inner", "pad_token_id"):
            continue
        if k not in ("head", "labels", "activation_function") and not isinstance(v, int | float):
            raise UserError(f"{where}: {k}={v!r} is not a number; fix config.json")
    fields.update(overrides)
    return GPT2Config(**fields)


def _first(value, default):
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def config_to_hf(cfg: GPT2Config) -> dict:
    """transformers' config.json for this model (LM or sequence-classification)."""
    hf = {
        "architectures": [ARCHITECTURES.get(cfg.head, "GPT2LMHeadModel")],
        "model_type": "gpt2",
        **{k: getattr(cfg, k) for k in HF_FIELDS},
        "n_ctx": cfg.n_positions,
        "reorder_and_upcast_attn": False,
        "bos_token_id": cfg.eos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }
    if cfg.head == "sequence":
        labels = cfg.labels or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
        hf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
        # transformers pools the rightmost token != pad_token_id; GPT-2 pads with EOS.
        hf["pad_token_id"] = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    elif cfg.pad_token_id is not None:
        hf["pad_token_id"] = cfg.pad_token_id
    return hf


# ---------------------------------------------------------------- files


def load_hf_dir(directory: str | Path, resolve: Callable[[GPT2Config], GPT2Config] | None = None,
                **overrides) -> GPT2:
    """Import a local transformers GPT-2 directory as a gpt2jax model; `resolve` fixes the
    config's automatic choices (run.for_this_process does it for the CLI)."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d} is not a directory; pass a transformers model directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{d} has no config.json; a transformers model directory needs config.json "
                        "next to model.safetensors (save it with save_pretrained)")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); fix or re-save it") from e
    if not isinstance(hf, dict):
        raise UserError(f"{cfg_path} must hold a JSON object")
    tensors = read_weights(d)
    cfg = config_from_hf(hf, where=str(cfg_path), **overrides)
    if resolve is not None:
        cfg = resolve(cfg)
    return from_hf_tensors(cfg, tensors, where=str(directory))


def read_weights(d: Path) -> dict[str, np.ndarray]:
    """Tensors from model.safetensors, a sharded index, or (with torch) pytorch_model.bin."""
    single, index, bin_ = (d / n for n in WEIGHT_FILES)
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e})") from e
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(d / shard))
        return tensors
    if bin_.is_file():
        try:
            import torch
        except ImportError:
            raise UserError(
                f"{d} has only pytorch_model.bin; install torch to read it, or convert it to "
                "model.safetensors"
            ) from None
        try:
            sd = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {bin_}: {e}") from e
        return {k: v.float().numpy() for k, v in sd.items()}
    raise UserError(f"{d} has config.json but no weights: expected model.safetensors, "
                    "model.safetensors.index.json with shards, or pytorch_model.bin")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """{name: numpy array} of a safetensors file; UserError for a missing or corrupt one."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"missing weight shard {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                        "re-download or re-export it") from e


def export_hf(model: GPT2, out: str | Path, tokenizer=None, *, overwrite: bool = False,
              backbone_only: bool = False) -> Path:
    """Write a transformers directory: config.json, model.safetensors, generation_config.json
    and the tokenizer files."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    if cfg.head == "attention_pool" and not backbone_only:
        raise UserError(
            "the attention_pool head has no transformers class; pass --backbone-only to "
            "export the GPT-2 backbone as GPT2LMHeadModel (the head weights are saved beside "
            "it in attention_pool_head.safetensors)"
        )
    export_cfg = cfg.replace(head="lm") if cfg.head == "attention_pool" else cfg

    def fill(tmp: Path) -> None:
        tensors = to_hf_tensors(_as_head(model, export_cfg))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if cfg.head == "attention_pool":
            pool = {k: v for k, v in to_flat_params(model).items() if k.startswith("pool.")}
            save_file(pool, str(tmp / "attention_pool_head.safetensors"))
        _write_json(tmp / "config.json", config_to_hf(export_cfg))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": cfg.eos_token_id, "eos_token_id": cfg.eos_token_id})

    return _write_dir(Path(out), overwrite, fill, tokenizer, cfg)


# ---------------------------------------------------------------- PEFT adapter directories


def export_adapter(model: GPT2, out: str | Path, groups=(), base: str = "", tokenizer=None,
                   *, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (README, "LoRA fine-tuning"); `groups`: the
    model.lora.train groups saved beside the adapters, `base`: the model they adapt."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    if not cfg.lora_rank:
        raise UserError("this model has no LoRA adapters (it was not trained with "
                        "model.lora); export it without --adapter")
    conf = lora.adapter_config(cfg, groups, base)
    flat = to_flat_params(model)

    def fill(tmp: Path) -> None:
        tensors = {**lora.to_peft(cfg, flat), **_saved_tensors(cfg, flat, groups)}
        save_file(tensors, str(tmp / lora.WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / lora.CONFIG_FILE, conf)

    return _write_dir(Path(out), overwrite, fill, tokenizer, cfg)


def _saved_tensors(cfg: GPT2Config, flat: dict[str, np.ndarray], groups) -> dict:
    """The non-adapter tensors an adapter file carries, PEFT-named: the sequence head
    (modules_to_save `score`), the LayerNorms (layer_norm) and every bias (bias)."""
    out = {}
    for hf_name, path in name_pairs(cfg):
        if _carried(path, groups):
            arr = _to_hf(cfg, hf_name, path, flat[path])
            module = hf_name.removesuffix(".bias")
            if path.endswith("bias") and module.split(".", 3)[-1] in cfg.lora_targets:
                hf_name = f"{module}.base_layer.bias"  # PEFT wraps an adapted module
            out[lora.PREFIX + hf_name] = arr
    return out


def _carried(path: str, groups=("layer_norm", "bias")) -> bool:
    """Whether an adapter file carries parameter `path` when these groups trained."""
    return path == "score.kernel" or ("ln_" in path and "layer_norm" in groups) or \
        (path.endswith("bias") and "bias" in groups)


def read_adapter(directory: str | Path, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Our flat entries (per-layer names) of a PEFT adapter directory for model config cfg:
    the adapters and the modules_to_save (a sequence head's `score`, LayerNorms, biases)."""
    d = Path(directory)
    lora.read_config(d, cfg)
    tensors = {k if k.startswith(lora.PREFIX) else lora.PREFIX + k: v
               for k, v in read_safetensors(d / lora.WEIGHTS_FILE).items()}
    out = lora.from_peft(cfg, {k: v for k, v in tensors.items() if "lora_" in k},
                         str(d / lora.WEIGHTS_FILE))
    ours = dict(name_pairs(cfg))
    for k, v in tensors.items():
        if "lora_" in k or ".original_module." in k:  # PEFT's copy of the base module
            continue
        hf_name = k.removeprefix(lora.PREFIX).replace(".base_layer", "")
        hf_name = _canonical(hf_name.replace(".modules_to_save", ""))
        path = ours.get(hf_name)
        if path is None:
            raise UserError(f"{d}: {k} is no parameter of a GPT-2 of this shape; the adapter "
                            "was made for another model")
        if not _carried(path):
            continue
        arr = np.asarray(v, np.float32)
        if path == "score.kernel" and arr.shape != (cfg.num_labels, cfg.n_embd):
            raise UserError(f"{d}: score.weight has shape {arr.shape} but the model has "
                            f"{cfg.num_labels} labels of width {cfg.n_embd}")
        # a wrong shape is left for the caller's check against the model
        out[path] = _from_hf(cfg, path, arr) if arr.shape == _hf_shape(cfg, hf_name) else arr
    return out


# ---------------------------------------------------------------- writing


def _write_dir(out: Path, overwrite: bool, fill: Callable[[Path], None], tokenizer,
               cfg: GPT2Config) -> Path:
    """Fill a temporary directory beside `out` (and save the tokenizer there as the model
    needs it), then rename it to `out`, so a failure never leaves a partial export behind;
    refuses a non-empty `out` unless overwrite."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if tokenizer is not None:
            _for_export(tokenizer, cfg).save_pretrained(str(tmp))
        _usual_permissions(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():  # --overwrite of a plain file
            out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _for_export(tokenizer, cfg: GPT2Config):
    """The tokenizer as the exported model needs it: truncation=True cuts at the model's
    context (n_positions), and a sequence classifier has a pad token (its EOS)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.n_positions
    if cfg.head == "sequence" and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _usual_permissions(directory: Path) -> None:
    """What a plain mkdir and open would give under the user's umask (mkdtemp makes the
    directory private, 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _as_head(model: GPT2, cfg: GPT2Config) -> GPT2:
    """The same weights viewed with another head config (for backbone-only export)."""
    if cfg == model.cfg:
        return model
    flat = {k: v for k, v in to_flat_params(model).items() if not k.startswith(("pool.", "score."))}
    return from_values(cfg, flat)
