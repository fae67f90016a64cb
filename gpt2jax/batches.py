"""Token arrays and the order in which the trainer sees them.

LM data: documents joined with EOS and packed into blocks of seq_len + 1 tokens (inputs
are block[:-1], targets block[1:]), no padding. Classification: one row per example,
padded per batch to a length bucket.

The order is a pure function of (seed, step): the global batch of step s holds examples
perm_e[j] for the global positions s*B ... s*B+B-1 (epoch e, offset j). A process takes
its contiguous slice of that batch, so the data seen does not depend on the number of
processes or the mesh, and resuming at step s needs no replay.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError


def pack(token_lists: Sequence[Sequence[int]], block: int, eos: int,
         masks: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Join documents with EOS (before each, so every document's first token is a target)
    and cut into (N, block) arrays of tokens and loss weights. A ragged tail is dropped."""
    total = sum(len(t) + 1 for t in token_lists)
    tokens = np.empty(total, np.int32)
    weights = np.ones(total, np.float32)
    pos = 0
    for i, toks in enumerate(token_lists):
        tokens[pos] = eos
        weights[pos] = 1.0
        tokens[pos + 1: pos + 1 + len(toks)] = toks
        if masks is not None:
            weights[pos + 1: pos + 1 + len(toks)] = masks[i]
        pos += len(toks) + 1
    # Blocks overlap by one token so every token is a target exactly once.
    stride = block - 1
    n = (total - 1) // stride
    if n == 0:
        raise UserError(f"the data holds {total} tokens, fewer than one block of {block}; "
                        "add data or lower train.seq_len")
    idx = np.arange(n)[:, None] * stride + np.arange(block)[None, :]
    return tokens[idx], weights[idx]


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad: int,
             batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows to `length`: (ids, attention_mask). With batch_size, missing
    rows are all padding, so every batch has one shape (one compile)."""
    n = len(rows) if batch_size is None else batch_size
    ids = np.full((n, length), pad, np.int32)
    mask = np.zeros((n, length), np.int32)
    for i, r in enumerate(rows):
        r = r[:length]
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def bucket(n: int, cap: int, minimum: int = 16) -> int:
    """Round a length up to a power of two (bounded), so few shapes get compiled."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, cap)


@dataclass
class Batcher:
    """Deterministic, resumable batches over equally indexed arrays.

    arrays: for LM {"tokens", "weights"} (N, block); for classification {"rows": list of
    token lists, "labels"} padded per batch.
    """

    arrays: dict
    batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    pad_id: int = 0
    max_len: int = 0
    _perm_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size % self.process_count:
            raise UserError(f"train.batch_size={self.batch_size} is not divisible by the "
                            f"{self.process_count} processes")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def steps_per_epoch(self) -> int:
        return max(len(self) // self.batch_size, 1)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = {epoch: rng.permutation(len(self))}
        return self._perm_cache[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        n = len(self)
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = pos // n, pos % n
        idx = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):  # one permutation lookup per epoch the batch touches
            sel = epochs == e
            idx[sel] = self._perm(int(e))[offsets[sel]]
        return idx

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`."""
        idx = self.global_indices(step)
        per = self.batch_size // self.process_count
        mine = idx[self.process_index * per: (self.process_index + 1) * per]
        if "rows" in self.arrays:
            rows = self.arrays["rows"]
            # Pad length from the whole global batch so every process compiles one shape.
            length = bucket(max(len(rows[i]) for i in idx), self.max_len)
            ids, mask = pad_rows([rows[i] for i in mine], length, self.pad_id)
            return {"input_ids": ids, "attention_mask": mask,
                    "labels": np.asarray(self.arrays["labels"])[mine].astype(np.int32)}
        return {k: np.asarray(v[mine]) for k, v in self.arrays.items()}

    def iterate(self, start: int, stop: int,
                prefetch: int = 2) -> Iterator[tuple[int, dict, float]]:
        """(step, batch, seconds the consumer waited) for start <= step < stop, prepared in
        a background thread."""
        import time

        q: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        stop_flag = threading.Event()

        def work() -> None:
            try:
                for s in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put((s, self.batch(s)))
            except BaseException as e:  # surfaced in the consumer
                q.put(e)
            q.put(None)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                waited = time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item[0], item[1], waited
        finally:
            stop_flag.set()
            while not q.empty():
                q.get_nowait()


# ---------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """Token arrays for the train and validation splits, plus what was learned on the way."""

    train: dict
    validation: dict | None
    labels: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)


def load_task_records(spec: str, data) -> list[dict]:
    """Records of a data spec: `gcide` (the dictionary package) or anything data.py loads."""
    from .data import load_task_dataset

    return load_task_dataset(spec, text_unit=data.text_unit, limit=data.limit).to_list()


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document-level split by seed: (train, validation) indices, in order."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    is_val = np.zeros(n, bool)
    is_val[perm[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic document-level split by seed (the split `prepare` makes)."""
    train, val = split_indices(len(records), fraction, seed)
    return [records[i] for i in train], [records[i] for i in val]


def prepare(data, tokenizer, *, seq_len: int, seed: int, eos: int,
            labels: Sequence[str] = ()) -> Prepared:
    """Load, split, render and tokenize a DataSection into arrays for the Batcher.

    Tokenized records are cached (see data.tokenize_task); the split, packing and
    truncation that follow are cheap and done every run.
    """
    from .data import tokenize_task

    train_tok, hit = tokenize_task(data.train, data, tokenizer, cache=data.cache_dir != "off")
    all_tok = train_tok
    if data.validation:
        val_tok = tokenize_task(data.validation, data, tokenizer,
                                cache=data.cache_dir != "off")[0]
    else:
        train_idx, val_idx = split_indices(len(train_tok), data.validation_fraction, seed)
        train_tok, val_tok = train_tok.select(train_idx), train_tok.select(val_idx)
    stats = {"cached": hit, "documents": len(train_tok),
             "bytes_per_token": train_tok.bytes_per_token()}
    if data.task == "classification":
        labels = tuple(labels) or tuple(data.labels) or _label_set(train_tok, data)
        train = _classification_rows(train_tok, data, labels, seq_len, eos)
        val = _classification_rows(val_tok, data, labels, seq_len, eos) if len(val_tok) else None
        stats.update(train_examples=len(train["labels"]),
                     truncated=train.pop("truncated") + (val.pop("truncated") if val else 0))
        if stats["truncated"]:
            total = len(train["labels"]) + (len(val["labels"]) if val else 0)
            print(f"gpt2jax: warning: {stats['truncated']} of {total} records are longer than "
                  f"train.seq_len={seq_len} tokens and were cut ({data.truncation} side "
                  "dropped; see data.truncation)", file=sys.stderr)
        return Prepared(train, val, labels, stats)

    def lm_arrays(tok) -> dict:
        masks = tok.token_lists(tok.weights) if tok.weights is not None else None
        tokens, weights = pack(tok.token_lists(), seq_len + 1, eos, masks)
        return {"tokens": tokens, "weights": weights}

    train, val, split = lm_arrays(train_tok), None, "none"
    if len(val_tok):
        try:
            val, split = lm_arrays(val_tok), "file" if data.validation else "documents"
        except UserError:
            val = None  # too little validation text for one block
    if val is None and not data.validation and data.validation_fraction > 0:
        if len(val_tok):  # the held-out documents were too short: split all by blocks
            train_tok = all_tok
            train = lm_arrays(train_tok)
        train, val = split_blocks(train, data.validation_fraction, seed)
        split = "blocks" if val is not None else "none"
    stats.update(train_tokens=int(train_tok.offsets[-1]), train_blocks=len(train["tokens"]),
                 validation_split=split)
    return Prepared(train, val, (), stats)


def split_blocks(arrays: dict, fraction: float, seed: int) -> tuple[dict, dict | None]:
    """Split packed blocks by seed when there are too few documents to split by document."""
    n = len(arrays["tokens"])
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 1:
        return arrays, None
    perm = np.random.default_rng([seed, 104729]).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return ({k: v[train_idx] for k, v in arrays.items()},
            {k: v[val_idx] for k, v in arrays.items()})


def _label_set(tok, data) -> tuple[str, ...]:
    """The sorted label names of the training records (numerically when all are integers)."""
    values = set(tok.labels.tolist())
    if len(values) < 2:
        raise UserError(f"data {data.train}: column {data.label_column!r} has only "
                        f"{len(values)} distinct label(s) {sorted(values)}; classification "
                        "needs at least 2")
    ints = all(v.lstrip("-").isdigit() for v in values)
    return tuple(sorted(values, key=int) if ints else sorted(values))


def _classification_rows(tok, data, labels, seq_len: int, eos: int) -> dict:
    """Token rows cut to seq_len on the data.truncation side, and label indices."""
    index = {name: i for i, name in enumerate(labels)}
    for i, y in enumerate(tok.labels.tolist()):
        if y not in index:
            raise UserError(f"{tok.source}: row {int(tok.rows[i])} (counting from 0), column "
                            f"{data.label_column!r}: label {y!r} is not in the label set "
                            f"{list(labels)}; fix the row or data.labels")
    # No EOS is appended: transformers pools the last token != pad (= eos) after export.
    rows, truncated = [], 0
    for r in tok.token_lists():
        if len(r) > seq_len:
            truncated += 1
            r = r[-seq_len:] if data.truncation == "left" else r[:seq_len]
        rows.append(r.tolist() if len(r) else [eos])
    return {"rows": rows, "labels": np.asarray([index[y] for y in tok.labels.tolist()], np.int32),
            "truncated": truncated}
