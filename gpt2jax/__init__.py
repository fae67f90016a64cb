"""gpt2jax: train and fine-tune GPT-2 in JAX/Flax NNX, with exact Hugging Face interop.

The Python API, usable from a notebook:

    from gpt2jax import load_model, export_hf
    model, tokenizer, _ = load_model("path/to/hf_dir")

Names are imported lazily so `import gpt2jax` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MODULES = {  # module -> the public names it provides
    "model": ("GPT2", "GPT2Config", "create_model"),
    "run": ("load_model",),
    "sources": ("resolve",),
    "hf": ("load_hf_dir", "export_hf"),
    "tokenizer": ("gpt2_tokenizer",),
    "config": ("load_config",),
    "train": ("train",),
    "evaluate": ("evaluate_lm", "evaluate_classification", "score", "token_logprobs"),
    "generate": ("generate",),
    "analysis": ("weight_diff",),
    "data": ("load_records",),
    "errors": ("UserError",),
}
_API = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'gpt2jax' has no attribute {name!r}")
