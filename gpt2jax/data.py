"""Data: records from local files or the Hugging Face hub, then the training pipeline.

Loading gives a `datasets.Dataset` of records (rows of named columns) whatever the source:

    load_records("notes.txt", text_unit="paragraph")   # column "text"
    load_records("reviews.csv")                         # the file's own columns
    load_records("corpus/")                             # every supported file below the folder
    load_records("hub:stanfordnlp/imdb@test")           # datasets.load_dataset

Every problem with the input (a missing or empty file, text that is not UTF-8, an unknown
extension, a hub dataset that cannot be reached) is a UserError naming the file.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import datasets

# ---------------------------------------------------------------- loading

TEXT_UNITS = ("document", "line", "paragraph")
# extension -> the `datasets` packaged builder that reads it
FORMATS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
HUB_PREFIX = "hub:"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hub:ORG/NAME[:CONFIG][@SPLIT]`."""

    name: str
    config: str | None = None
    split: str | None = None


def parse_hub_spec(spec: str) -> HubSpec:
    """Split `hub:ORG/NAME[:CONFIG][@SPLIT]` into its parts."""
    body = spec.removeprefix(HUB_PREFIX)
    body, _, split = body.partition("@")
    name, colon, config = body.partition(":")
    if not name or (colon and not config) or ("@" in spec and not split):
        raise UserError(
            f"bad hub dataset {spec!r}: write hub:ORG/NAME, hub:ORG/NAME:CONFIG, "
            "hub:ORG/NAME@SPLIT or hub:ORG/NAME:CONFIG@SPLIT"
        )
    return HubSpec(name, config or None, split or None)


def load_records(
    spec: str | os.PathLike, *, split: str | None = None, text_unit: str = "document"
) -> datasets.Dataset:
    """Records from a local file, a folder of files, or `hub:ORG/NAME[:CONFIG][@SPLIT]`.

    Local formats: .txt (a whole file is one record in column "text"; text_unit "line"
    makes each non-blank line a record, "paragraph" each block between blank lines),
    .jsonl/.json, .csv/.tsv and .parquet (their own columns). A folder is every supported
    file below it, in sorted order, which must share columns.

    `split` picks a split: for the hub, the split to load (the spec's `@SPLIT` wins; with
    neither, a dataset with one split gives it, otherwise an error lists the splits); for
    a folder, the files named after it as `datasets` lays them out (train.jsonl,
    train-00001.csv, train/...). A single local file is one split and is returned whole.
    """
    if text_unit not in TEXT_UNITS:
        raise UserError(f"text unit {text_unit!r}: choose one of {', '.join(TEXT_UNITS)}")
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        return _load_hub(parse_hub_spec(spec), split, text_unit)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data {spec} does not exist; check the path (hub datasets: hub:ORG/NAME)")
    files = _data_files(path, split)
    ds = _load_files(files, text_unit)
    if len(ds) == 0:
        raise UserError(f"{spec} holds no records; check that it has content")
    return ds


def require_column(ds: datasets.Dataset, column: str, where: str) -> None:
    """UserError unless `ds` has `column`; the message lists the columns it has."""
    if column not in ds.column_names:
        raise UserError(
            f"{where} has no column {column!r}; its columns are: {', '.join(ds.column_names)} "
            "(pick one with --text-column / --label-column)"
        )


def _data_files(path: Path, split: str | None) -> list[Path]:
    """The supported files a local path names (a file, or a folder searched recursively)."""
    if path.is_file():
        _check_extension(path)
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    files = [p for p in found if p.suffix.lower() in FORMATS]
    if not files:
        raise UserError(
            f"folder {path} has no data files; supported extensions: {', '.join(FORMATS)}"
        )
    if split is not None:
        chosen = [p for p in files if _split_of(p, path) == split]
        if not chosen:
            names = sorted({s for p in files if (s := _split_of(p, path))})
            have = f"splits found: {', '.join(names)}" if names else "no files are named by split"
            raise UserError(
                f"folder {path} has no {split!r} split ({have}); name files like "
                f"{split}.jsonl or put them in {path / split}/"
            )
        files = chosen
    return files


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _split_of(p: Path, root: Path) -> str | None:
    """The split a file belongs to by name: train.jsonl, train-0001.csv, train/x.txt."""
    rel = p.relative_to(root).parts
    if len(rel) > 1:
        return rel[0]
    stem = p.name.split(".")[0]
    return re.split(r"[-_.]", stem)[0] or None


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"{path}: unsupported data file extension {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )


def _load_files(files: list[Path], text_unit: str) -> datasets.Dataset:
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f} is empty; remove it or give it content")
        if FORMATS[f.suffix.lower()] != "parquet":
            _check_utf8(f)
    texts = [f for f in files if FORMATS[f.suffix.lower()] == "text"]
    tables = [f for f in files if FORMATS[f.suffix.lower()] != "text"]
    if texts and tables:
        raise UserError(
            f"{files[0].parent} mixes .txt files with table files ({texts[0].name}, "
            f"{tables[0].name}); keep one kind of data per folder"
        )
    if texts:
        return datasets.Dataset.from_dict({"text": list(_text_records(texts, text_unit))})
    if text_unit != "document":
        raise UserError(
            f"--text-unit {text_unit} applies to .txt files; {tables[0]} is a table, "
            "whose rows are the records"
        )
    builders = {FORMATS[f.suffix.lower()] for f in tables}
    seps = {"\t" if f.suffix.lower() == ".tsv" else "," for f in tables}
    if len(builders) > 1 or len(seps) > 1:
        kinds = ", ".join(sorted({f.suffix for f in tables}))
        raise UserError(
            f"{tables[0].parent} mixes file formats ({kinds}); keep one format per folder"
        )
    builder = builders.pop()
    kwargs = {"sep": seps.pop()} if builder == "csv" else {}
    try:
        return _build(builder, tables, kwargs)
    except _read_errors() as e:
        culprit = _first_failing(builder, tables, kwargs) if len(tables) > 1 else tables[0]
        where = culprit or ", ".join(map(str, tables))
        raise UserError(
            f"cannot read {where} as {builder}: {_cause(e)}; check the file's format"
        ) from e


def _read_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` raises for a file it cannot parse (not for bugs)."""
    import pyarrow
    from datasets.exceptions import DatasetsError

    return (DatasetsError, pyarrow.ArrowException, ValueError, OSError)


def _build(builder: str, files: list[Path], kwargs: dict) -> datasets.Dataset:
    import datasets

    with _quiet():
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", **kwargs
        )


def _first_failing(builder: str, files: list[Path], kwargs: dict) -> Path | None:
    """The file that makes a multi-file load fail, when one fails alone."""
    for f in files:
        try:
            _build(builder, [f], kwargs)
        except _read_errors():
            return f
    return None


def _cause(e: BaseException) -> str:
    """The innermost exception's message (datasets wraps parser errors in its own)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """UserError naming the file and byte offset when it is not UTF-8 text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a split character, kept back
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise UserError(
                    f"{path} is not UTF-8 text (undecodable byte at offset {at}); "
                    "convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if not block:
                return
            offset += len(block)


def _text_records(files: list[Path], text_unit: str) -> Iterator[str]:
    for f in files:
        text = f.read_text(encoding="utf-8")
        yield from split_text(text, text_unit)


def split_text(text: str, text_unit: str) -> list[str]:
    """One document as records: itself, its non-blank lines, or its paragraphs."""
    if text_unit == "line":
        return [ln for ln in text.splitlines() if ln.strip()]
    if text_unit == "paragraph":
        return [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    return [text] if text.strip() else []


def _load_hub(hub: HubSpec, split: str | None, text_unit: str) -> datasets.Dataset:
    import datasets

    if text_unit != "document":
        raise UserError(f"--text-unit {text_unit} applies to local .txt files, not hub datasets")
    spec = f"{HUB_PREFIX}{hub.name}"
    want = hub.split or split
    try:
        with _quiet():
            loaded = datasets.load_dataset(hub.name, hub.config, split=want)
    except Exception as e:
        if _offline():
            raise UserError(
                f"dataset {spec} is not in the local cache and the hub is offline "
                "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set); use a local file, or unset "
                "the variable on a machine with network"
            ) from e
        raise UserError(
            f"cannot load dataset {spec} from the Hugging Face hub ({_cause(e)}); "
            "check the name, config and split, and the network"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserError(
                f"dataset {spec} has splits {', '.join(loaded)}; pick one with "
                f"{spec}@SPLIT"
            )
        loaded = next(iter(loaded.values()))
    if len(loaded) == 0:
        raise UserError(f"dataset {spec} is empty")
    return loaded


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


@contextlib.contextmanager
def _quiet():
    """No datasets progress bars while loading (they would mix with the CLI's output)."""
    import datasets
    from datasets.utils import logging as ds_logging

    was_disabled = datasets.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    # parse failures are logged and then raised; the raised one becomes our UserError
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not was_disabled:
            datasets.enable_progress_bars()
