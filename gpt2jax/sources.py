"""Model sources (SRC): what a string names, in the order README's "The command line"
gives (hf:X / run:X, a run, a checkpoint, a transformers directory, a hub name);
run.load_model loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# what hub_download fetches: config, weights (single or sharded) and tokenizer
HUB_PATTERNS = [
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json",
]


@dataclass(frozen=True)
class Source:
    """A resolved model source."""

    kind: str  # "hf_dir" | "hub" | "run" | "checkpoint"
    path: str  # directory, or hub name
    step: int | str | None = None  # for runs: None (latest), an int, or "best"

    def describe(self) -> str:
        """The source for messages: its path or name, and a run's step."""
        if self.kind in ("run", "checkpoint"):
            return f"{self.path} (step {self.step if self.step is not None else 'latest'})"
        return self.path


def resolve(src: str, step: int | str | None = None) -> Source:
    """Decide what kind of source `src` names (no loading)."""
    forced = None
    if src.startswith(("hf:", "run:")):
        forced, src = src.split(":", 1)
    if not src:  # checked after the prefix: a bare "hf:" must not mean the current directory
        where = f" after {forced}:" if forced else ""
        raise UserError(f"empty model source{where}; pass a directory, a run, or hf:NAME")
    try:
        p = Path(src).expanduser()
    except RuntimeError:  # ~user of an unknown user, or no home directory
        raise UserError(f"model source {src}: cannot expand its ~; give a full path") from None
    if forced == "run" or (forced is None and _is_run(p)):
        if not _is_run(p):
            raise UserError(f"{src} is not a gpt2jax run directory (no config.yaml + checkpoints/)")
        return Source("run", str(p), step)
    if forced is None and p.is_dir() and p.parent.name == "checkpoints" and p.name.isdigit():
        return Source("checkpoint", str(p.parent.parent), int(p.name))
    if p.is_dir() and (forced == "hf" or (p / "config.json").exists()):
        return Source("hf_dir", str(p))
    if p.exists():
        raise UserError(
            f"{src} is neither a transformers directory (config.json + model.safetensors) "
            "nor a gpt2jax run (config.yaml + checkpoints/)"
        )
    if not _looks_like_hub(src) or (forced is None and p.parent.is_dir() and p.parent.name):
        # "runs/dmeo" where runs/ exists is a mistyped path, not a hub organisation
        raise UserError(f"model source {src} does not exist{_near(p)}; check the path"
                        + ("" if forced or not _looks_like_hub(src) else
                           f", or write hf:{src} for the Hugging Face hub name"))
    return Source("hub", src)


def _is_run(p: Path) -> bool:
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def _near(p: Path) -> str:
    """' (did you mean X?)' for a sibling with a close name, else ''."""
    import difflib

    try:
        siblings = [c.name for c in p.parent.iterdir()] if p.parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, siblings, n=1)
    return f" (did you mean {p.parent / close[0]}?)" if close else ""


def _looks_like_hub(src: str) -> bool:
    """"gpt2" or "org/name"; anything path-like that does not exist is a missing path."""
    parts = src.split("/")
    return len(parts) <= 2 and all(parts) and not src.startswith((".", "~"))


def hub_download(name: str) -> Path:
    """Download a hub model's config, weights and tokenizer; a clear error when offline."""
    from .data import hub_offline

    if hub_offline("HF_HUB_OFFLINE"):
        raise UserError(f"{name!r} is not a local directory and the Hugging Face hub is offline "
                        "(HF_HUB_OFFLINE=1); pass a local model directory or unset HF_HUB_OFFLINE")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, 404, auth: all are about the user's input/environment
        raise UserError(f"cannot download {name!r} from the Hugging Face hub ({type(e).__name__}); "
                        "check the name and the network, or pass a local directory") from e


def source_tokenizer(src: str):
    """The tokenizer of a SRC string, without loading its weights."""
    from .tokenizer import load_tokenizer

    source = resolve(src)
    if source.kind == "hub":
        return load_tokenizer(hub_download(source.path))
    directory = source.path if source.kind == "hf_dir" else Path(source.path) / "tokenizer"
    return load_tokenizer(directory)  # a run without tokenizer/ has GPT-2's
