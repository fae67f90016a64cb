"""Data: records from local files, folders, the Hugging Face hub or GCIDE as a
`datasets.Dataset`, then tokenized and cached (docs/data.md). Every problem with the input
is a UserError naming the file.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .compile_cache import cache_root
from .errors import UserError

if TYPE_CHECKING:
    import datasets

# ---------------------------------------------------------------- loading

TEXT_UNITS = ("document", "line", "paragraph")
# extension -> the `datasets` packaged builder that reads it
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet"}
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
        raise UserError(f"bad hub dataset {spec!r}: write hub:ORG/NAME, hub:ORG/NAME:CONFIG, "
                        "hub:ORG/NAME@SPLIT or hub:ORG/NAME:CONFIG@SPLIT")
    return HubSpec(name, config or None, split or None)


def load_records(spec: str | os.PathLike, *, split: str | None = None,
                 text_unit: str = "document", limit: int = 0) -> datasets.Dataset:
    """Records of a local file or folder, `hub:ORG/NAME[:CONFIG][@SPLIT]` or
    `gcide[:LETTERS]`, at most `limit` of them when it is set; `split` and `text_unit` as
    docs/data.md describes them."""
    import datasets

    if text_unit not in TEXT_UNITS:
        raise UserError(f"text unit {text_unit!r}: choose one of {', '.join(TEXT_UNITS)}")
    spec = str(spec)
    if _is_gcide(spec):
        from .tasks import iter_gcide

        letters = spec.split(":", 1)[1] if ":" in spec else string.ascii_uppercase
        ds = datasets.Dataset.from_list(list(iter_gcide(letters)))
    elif spec.startswith(HUB_PREFIX):
        ds = _load_hub(parse_hub_spec(spec), split, text_unit)
    else:
        ds = _load_files(_data_files(_existing(spec), split), text_unit)
    if len(ds) == 0:
        raise UserError(f"{spec} holds no records; check that it has content")
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def require_column(ds: datasets.Dataset, column: str, where: str) -> None:
    """UserError unless `ds` has `column`; the message lists the columns it has."""
    if column not in ds.column_names:
        raise UserError(
            f"{where} has no column {column!r}; its columns are: {', '.join(ds.column_names)} "
            "(pick one with data.text_column / data.label_column, or --text-column / "
            "--label-column)"
        )


def _existing(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data {spec} does not exist; check the path (hub datasets: hub:ORG/NAME)")
    return path


def _data_files(path: Path, split: str | None) -> list[Path]:
    """The supported files a local path names (a file, or a folder searched recursively)."""
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise UserError(f"{path}: unsupported data file extension "
                            f"{path.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in FORMATS and not _hidden(p, path))
    if not files:
        raise UserError(
            f"folder {path} has no data files; supported extensions: {', '.join(FORMATS)}"
        )
    if split is not None:
        chosen = [p for p in files if _split_of(p, path) == split]
        if not chosen:
            names = sorted({s for p in files if (s := _split_of(p, path))})
            have = f"splits found: {', '.join(names)}" if names else "no files are named by split"
            raise UserError(f"folder {path} has no {split!r} split ({have}); name files like "
                            f"{split}.jsonl or put them in {path / split}/")
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
        raise UserError(f"{files[0].parent} mixes .txt files with table files ({texts[0].name}, "
                        f"{tables[0].name}); keep one kind of data per folder")
    if texts:
        records = [r for f in texts for r in _split_text(f.read_text(encoding="utf-8"), text_unit)]
        return datasets.Dataset.from_dict({"text": records})
    if text_unit != "document":
        raise UserError(f"--text-unit {text_unit} applies to .txt files; {tables[0]} is a table, "
                        "whose rows are the records")
    kinds = {(FORMATS[f.suffix.lower()], f.suffix.lower() == ".tsv") for f in tables}
    if len(kinds) > 1:
        suffixes = ", ".join(sorted({f.suffix for f in tables}))
        raise UserError(f"{tables[0].parent} mixes file formats ({suffixes}); keep one format "
                        "per folder")
    builder, tsv = kinds.pop()
    kwargs = {"sep": "\t" if tsv else ","} if builder == "csv" else {}
    try:
        return _build(builder, tables, kwargs)
    except _read_errors() as e:
        culprit = _first_failing(builder, tables, kwargs) if len(tables) > 1 else tables[0]
        where = culprit or ", ".join(map(str, tables))
        if "corresponds to no data" in _cause(e):  # e.g. a csv with a header and no rows
            raise UserError(f"{where} holds no records (no rows after the header?); "
                            "check that it has content") from e
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
                raise UserError(f"{path} is not UTF-8 text (undecodable byte at offset {at}); "
                                "convert it, e.g. iconv -f latin1 -t utf-8") from None
            if not block:
                return
            offset += len(block)


def _split_text(text: str, text_unit: str) -> list[str]:
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
    spec = f"{HUB_PREFIX}{hub.name}" + (f":{hub.config}" if hub.config else "")
    try:
        with _quiet():
            loaded = datasets.load_dataset(hub.name, hub.config, split=hub.split or split)
    except Exception as e:
        # datasets answers an unknown split or config with ValueError, also offline
        if hub_offline("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") and not isinstance(e, ValueError):
            raise UserError(
                f"dataset {spec} is not in the local cache and the hub is offline "
                "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set); use a local file, or unset "
                "the variable on a machine with network"
            ) from e
        raise UserError(
            f"cannot load dataset {spec} ({_cause(e)}); check the name, config and split"
            + ("" if Path(hub.name).is_dir() else ", and the network")
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserError(f"dataset {spec} has splits {', '.join(loaded)}; pick one with "
                            f"{spec}@SPLIT")
        loaded = next(iter(loaded.values()))
    if len(loaded) == 0:
        raise UserError(f"dataset {spec} is empty")
    return loaded


def hub_offline(*variables: str) -> bool:
    """Whether one of these environment variables turns the hub off, as huggingface_hub
    reads them (1, true, yes, on)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in variables)


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


# ---------------------------------------------------------------- task records -> tokens

GCIDE = "gcide"
CACHE_VERSION = 3  # 3: GCIDE definitions without source tags


def _is_gcide(spec: str) -> bool:
    return spec == GCIDE or spec.startswith(GCIDE + ":")


@dataclass
class Tokenized:
    """Tokenized records as flat arrays (docs/data.md, stage 2): record i is
    ids[starts[i]:starts[i] + lengths[i]]; ids and weights may be read-only memory maps."""

    ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    nbytes: np.ndarray
    rows: np.ndarray
    weights: np.ndarray | None = None
    labels: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def record(self, i: int) -> np.ndarray:
        """Record i's token ids as an int32 array."""
        a = int(self.starts[i])
        return np.asarray(self.ids[a: a + int(self.lengths[i])], np.int32)

    def select(self, idx: np.ndarray) -> Tokenized:
        """The records at `idx`, in that order (the token arrays are shared, not copied)."""
        idx = np.asarray(idx, np.int64)
        return replace(self, starts=self.starts[idx], lengths=self.lengths[idx],
                       nbytes=self.nbytes[idx], rows=self.rows[idx],
                       labels=None if self.labels is None else self.labels[idx])

    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token over all records."""
        return float(self.nbytes.sum()) / max(self.n_tokens, 1)


def tokenize_task(spec: str, data, tokenizer, *, cache: bool = True) -> tuple[Tokenized, bool]:
    """Load, render and tokenize the records of `spec` once; (Tokenized, from_cache). The
    result is cached under `cache_path` as .npy files that later runs memory-map
    (docs/data.md, stage 2)."""
    def load() -> datasets.Dataset:
        return load_records(spec, text_unit=data.text_unit, limit=data.limit)

    # the hub copy can change under the same name: key it by the loaded dataset
    ds = load() if spec.startswith(HUB_PREFIX) else None
    path = cache_path(spec, data, tokenizer, ds) if cache else None
    if path is not None and (path / "meta.json").is_file():
        try:
            return _read_cache(path, spec), True
        except (OSError, ValueError, KeyError) as e:  # torn or foreign: tokenize again
            print(f"gpt2jax: warning: the data cache {path} is unreadable ({e}); "
                  "tokenizing again", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
    ds = load() if ds is None else ds
    tmp = None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(path.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        except OSError as e:  # a read-only cache is not fatal: tokenize in memory
            print(f"gpt2jax: warning: cannot write the data cache {path}: {e.strerror}",
                  file=sys.stderr)
    if tmp is None:
        return tokenize_dataset(ds, data, tokenizer, where=spec), False
    try:
        tokenize_dataset(ds, data, tokenizer, where=spec, out_dir=tmp)
        try:
            os.rename(tmp, path)  # atomic: other processes see all of it or nothing
        except OSError:  # another process finished first: its copy is the same
            if not (path / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_cache(path, spec), False


def _remove_stale(root: Path, age: float = 86400.0) -> None:
    """Remove temporary tokenizing folders (`.<key>.*`) a day old, left by killed runs
    (never another process's tokenizing in progress)."""
    for tmp in root.glob(".*"):
        try:
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > age:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def cache_dir(data) -> Path:
    """Where tokenized data is cached: data.cache_dir, $GPT2JAX_CACHE or ~/.cache/gpt2jax."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else cache_root()


def cache_path(spec: str, data, tokenizer, loaded: datasets.Dataset | None = None) -> Path:
    """The cache folder of (source, task settings, tokenizer); the source's content is
    identified by the `loaded` dataset's fingerprint when given (hub data), else by its
    files."""
    key = {
        "version": CACHE_VERSION,
        "spec": spec,
        "source": [spec, loaded._fingerprint] if loaded is not None else source_fingerprint(spec),
        "task": data.task,
        "text_column": data.text_column,
        "label_column": data.label_column if data.task == "classification" else None,
        "text_unit": data.text_unit,
        "limit": data.limit,
        "templates": [data.prompt_template, data.target_template, data.example_template],
        "loss_on": data.loss_on,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir(data) / "tokenized" / digest


def source_fingerprint(spec: str) -> list:
    """What identifies a local source's content: (name, size, mtime) of its files."""
    if _is_gcide(spec):
        from .tasks import gcide_dir

        files = sorted(gcide_dir().glob("words_*.json"))
    else:
        root = _existing(spec)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(
        (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)))
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize_dataset(ds: datasets.Dataset, data, tokenizer, where: str = "data",
                     out_dir: Path | None = None) -> Tokenized:
    """Render each record with its task's template and tokenize, in one batched map; with
    out_dir, into the cache's files there (`write_store`), else in memory. Errors name the
    source, the row (counting from 0) and the column."""
    from .tasks import Templates

    classification = data.task == "classification"
    templates = Templates.from_data(data)
    for column in needed_columns(data, templates, ds.column_names):
        require_column(ds, column, where)
    want_weights = not classification and data.loss_on == "target"

    def batch_fn(batch: dict, idx: list[int]) -> dict:
        rows = []
        for row, values in zip(idx, zip(*batch.values())):
            try:
                rows.append(_render_row(dict(zip(batch, values)), data, templates))
            except UserError as e:
                raise UserError(f"{where}: row {row} (counting from 0): {e}") from None
        texts = [text for _, text, _ in rows]
        enc = tokenizer(texts, add_special_tokens=False, verbose=False,
                        return_offsets_mapping=want_weights)
        out = {"ids": enc["input_ids"], "row": list(idx),
               "nbytes": [len(t.encode("utf-8")) for t in texts]}
        if want_weights:
            # a token is learned when it ends inside the target (after the prompt's text)
            out["weights"] = [[1 if end > len(prompt) else 0 for _, end in offs]
                              for (prompt, _, _), offs in zip(rows, enc["offset_mapping"])]
        if classification:
            out["label"] = [label for _, _, label in rows]
        return out

    with _quiet():
        mapped = ds.map(batch_fn, batched=True, with_indices=True, batch_size=1000,
                        remove_columns=ds.column_names, keep_in_memory=out_dir is None,
                        cache_file_name=None if out_dir is None else str(out_dir / "map.arrow"),
                        new_fingerprint=f"gpt2jax-tokenize-{id(batch_fn)}")
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    out = write_store(mapped, out_dir, dtype, where)
    if out_dir is not None:
        del mapped
        (out_dir / "map.arrow").unlink(missing_ok=True)
    return out


def write_store(mapped: datasets.Dataset, out_dir: Path | None, dtype, where: str) -> Tokenized:
    """The tokenized columns as a Tokenized; with out_dir, as the cache's .npy files there,
    copied chunk by chunk and memory-mapped, meta.json last (a folder without it is torn)."""
    import pyarrow.compute as pc

    table = mapped.data
    lengths = pc.list_value_length(table.column("ids")).to_numpy().astype(np.int64)
    total = int(lengths.sum())
    small = {"starts": np.cumsum(lengths) - lengths, "lengths": lengths,
             "nbytes": np.asarray(mapped["nbytes"], np.int64),
             "rows": np.asarray(mapped["row"], np.int64)}
    if "label" in table.column_names:
        small["labels"] = np.asarray(mapped["label"], dtype=str)
    flat = {}
    for name, kind in (("ids", dtype), ("weights", np.uint8)):  # weights are 0/1 masks
        if name in table.column_names:
            flat[name] = arr = np.empty(total, kind) if out_dir is None else \
                np.lib.format.open_memmap(out_dir / f"{name}.npy", "w+", kind, (total,))
            pos = 0
            for chunk in table.column(name).chunks:  # one chunk in memory at a time
                values = chunk.flatten().to_numpy(zero_copy_only=False)
                arr[pos: pos + len(values)] = values
                pos += len(values)
    if out_dir is None:
        return Tokenized(**flat, **small, source=where)
    for arr in flat.values():
        arr.flush()
    for name, arr in small.items():
        np.save(out_dir / f"{name}.npy", arr, allow_pickle=False)
    meta = {"version": CACHE_VERSION, "records": len(lengths), "tokens": total, "source": where}
    (out_dir / "meta.json").write_text(json.dumps(meta) + "\n")
    return _read_cache(out_dir, where)


def needed_columns(data, templates, columns: list[str]) -> list[str]:
    """The columns a task reads: text (and label), or the fields its templates name."""
    if data.task == "classification":
        return [data.text_column, data.label_column]
    prompt, target = templates.for_task(data.task)
    if prompt or target:
        return [f for _, f, _, _ in string.Formatter().parse(prompt + target) if f]
    if data.task == "conversation" and "messages" in columns:
        return ["messages"]
    return [data.text_column]


def _render_row(record: dict, data, templates) -> tuple[str, str, str | None]:
    """(prompt, training text, label) of one record for its task."""
    from .tasks import render

    if data.task == "classification":
        return "", _text_cell(record, data.text_column), _label_cell(record, data.label_column)
    if data.task in ("lm", "text") and not templates.prompt and not templates.target:
        _text_cell(record, data.text_column)  # refuse a gap or a number before rendering
    prompt, target = render(data.task, record, data.text_column, templates)
    return prompt, prompt + target, None


def _text_cell(record: dict, column: str) -> str:
    value = record.get(column)
    if not isinstance(value, str):
        raise UserError(f"column {column!r} holds {value!r}, not text; fill the row or pick "
                        "the text column with data.text_column")
    return value


def _label_cell(record: dict, column: str) -> str:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"column {column!r} has no label; fill it or remove the row")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # csv readers turn an integer column with gaps into floats
    return str(value)


def _read_cache(path: Path, source: str) -> Tokenized:
    """A cache folder's arrays; the token arrays as read-only memory maps."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('version')}")
    arrays = {}
    for name in ("ids", "starts", "lengths", "nbytes", "rows", "weights", "labels"):
        if (f := path / f"{name}.npy").is_file():
            mmap = "r" if name in ("ids", "weights") else None
            arrays[name] = np.load(f, mmap_mode=mmap, allow_pickle=False)
    if not {"ids", "starts", "lengths", "nbytes", "rows"} <= set(arrays) or \
            len(arrays["ids"]) != meta["tokens"] or len(arrays["starts"]) != meta["records"]:
        raise ValueError(f"incomplete cache {path}")
    return Tokenized(**arrays, source=source)
