"""gpt2jax: train and fine-tune GPT-2 in JAX/Flax NNX, with exact Hugging Face interop.

The Python API, usable from a notebook:

    from gpt2jax import load_model, export_hf
    model, tokenizer, _ = load_model("path/to/hf_dir")

Names are imported lazily so `import gpt2jax` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "GPT2": "model",
    "GPT2Config": "model",
    "create_model": "model",
    "load_model": "run",
    "resolve": "sources",
    "load_hf_dir": "hf",
    "export_hf": "hf",
    "gpt2_tokenizer": "tokenizer",
    "load_config": "config",
    "train": "train",
    "evaluate_lm": "evaluate",
    "evaluate_classification": "evaluate",
    "score": "evaluate",
    "token_logprobs": "evaluate",
    "generate": "generate",
    "weight_diff": "analysis",
    "load_records": "data",
    "UserError": "errors",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'gpt2jax' has no attribute {name!r}")
