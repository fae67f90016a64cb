"""Token arrays and the order in which the trainer sees them: LM blocks of seq_len + 1
tokens, classification rows padded per batch, and the (seed, step) order of batches
(docs/data.md, stages 4 and 5).
"""

from __future__ import annotations

import functools
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from .data import Tokenized


class LMBlocks:
    """Documents, each after an EOS, cut into blocks of `block` tokens overlapping by one
    (a ragged tail dropped), read on demand; with `segments` (data.packing=documents) a
    block also carries each token's document piece (docs/data.md)."""

    def __init__(self, tok: Tokenized, block: int, eos: int, index: np.ndarray | None = None,
                 segments: bool = False):
        self.tok, self.block, self.eos, self.index = tok, block, eos, index
        self.segments = segments
        span = np.asarray(tok.lengths, np.int64) + 1  # the document and its leading EOS
        self.ends = np.cumsum(span)  # stream position just past document i
        total = int(self.ends[-1]) if len(span) else 0
        self.n_blocks = max(total - 1, 0) // (block - 1)
        if self.n_blocks == 0:
            raise UserError(f"the data holds {total} tokens, fewer than one block of {block}; "
                            "add data or lower train.seq_len")

    def __len__(self) -> int:
        return self.n_blocks if self.index is None else len(self.index)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Blocks `idx` (positions in this source): tokens int32 and weights float32 (and
        segments int32, numbered from 0 in each block)."""
        blocks = np.asarray(idx, np.int64)
        if self.index is not None:
            blocks = self.index[blocks]
        pos = blocks[:, None] * (self.block - 1) + np.arange(self.block)
        doc = np.searchsorted(self.ends, pos, side="right")
        local = pos - (self.ends[doc] - self.tok.lengths[doc])  # -1 at a document's EOS
        keep = local >= 0  # EOS positions are not in the token store: never read them
        src = (np.asarray(self.tok.starts)[doc] + local)[keep]
        tokens = np.full(pos.shape, self.eos, np.int32)
        tokens[keep] = self.tok.ids[src]
        weights = np.ones(pos.shape, np.float32)
        if self.tok.weights is not None:
            weights[keep] = self.tok.weights[src]
        out = {"tokens": tokens, "weights": weights}
        if self.segments:
            out["segments"] = (doc - doc[:, :1]).astype(np.int32)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Every block (reads all the tokens: small data, notebooks and tests)."""
        return self.take(np.arange(len(self)))

    def subset(self, idx: np.ndarray) -> LMBlocks:
        """The blocks at `idx`, as a view."""
        index = np.asarray(idx, np.int64) if self.index is None else self.index[idx]
        return LMBlocks(self.tok, self.block, self.eos, index, self.segments)


class ClassRows:
    """Classification examples: token rows cut to seq_len on the `truncation` side, and
    label indices; rows are read per batch."""

    def __init__(self, tok: Tokenized, labels: np.ndarray, seq_len: int, truncation: str,
                 eos: int):
        self.tok, self.labels = tok, np.asarray(labels, np.int32)
        self.seq_len, self.truncation, self.eos = seq_len, truncation, eos

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        """Row lengths after truncation (an empty record becomes one EOS token)."""
        return np.clip(np.asarray(self.tok.lengths)[idx], 1, self.seq_len)

    def row(self, i: int) -> np.ndarray:
        # No EOS is appended: transformers pools the last token != pad (= eos) after export.
        r = self.tok.record(int(i))
        if len(r) > self.seq_len:
            r = r[-self.seq_len:] if self.truncation == "left" else r[: self.seq_len]
        return r if len(r) else np.asarray([self.eos], np.int32)

    def truncated(self) -> int:
        """How many records are longer than seq_len."""
        return int((np.asarray(self.tok.lengths) > self.seq_len).sum())

    def take(self, idx: np.ndarray, length: int, pad: int) -> dict[str, np.ndarray]:
        """Rows `idx` padded to `length`, with their attention mask and labels."""
        ids, mask = pad_rows([self.row(i) for i in idx], length, pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx]}


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


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of an epoch's n examples (kept for the epoch's steps)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class Batcher:
    """Deterministic, resumable batches over LMBlocks or ClassRows (padded per batch to a
    length bucket). `accum`: the micro-batches a step accumulates over; a process's rows,
    reshaped to (accum, rows, ...), are its slices of the step's global micro-batches.
    """

    source: LMBlocks | ClassRows
    batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    pad_id: int = 0
    max_len: int = 0
    accum: int = 1

    def __post_init__(self) -> None:
        if self.batch_size % (self.accum * self.process_count):
            raise UserError(f"train.batch_size={self.batch_size} is not divisible by "
                            f"train.grad_accum={self.accum} x {self.process_count} processes")

    def __len__(self) -> int:
        return len(self.source)

    def steps_per_epoch(self) -> int:
        """Steps to see every example once (at least 1)."""
        return max(len(self) // self.batch_size, 1)

    def global_indices(self, step: int) -> np.ndarray:
        """The examples of the global batch of `step`."""
        n = len(self)
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = pos // n, pos % n
        idx = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):  # one permutation lookup per epoch the batch touches
            sel = epochs == e
            idx[sel] = _permutation(self.seed, int(e), n)[offsets[sel]]
        return idx

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`: its slice of micro-batch 0,
        then of micro-batch 1, ... (see the class docstring)."""
        idx = self.global_indices(step)
        per = self.batch_size // (self.accum * self.process_count)
        mine = idx.reshape(self.accum, self.process_count, per)[:, self.process_index].ravel()
        if isinstance(self.source, ClassRows):
            # Pad length from the whole global batch (lengths only, no tokens read) so
            # every process compiles one shape.
            length = bucket(int(self.source.lengths(idx).max()), self.max_len)
            return self.source.take(mine, length, self.pad_id)
        return self.source.take(mine)

    def iterate(self, start: int, stop: int,
                prefetch: int = 2) -> Iterator[tuple[int, dict, float]]:
        """(step, batch, seconds the consumer waited) for start <= step < stop, prepared
        `prefetch` steps ahead in a background thread."""
        import time
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="gpt2jax-batches")
        ahead = deque(pool.submit(self.batch, s) for s in range(start, min(start + prefetch, stop)))
        try:
            for s in range(start, stop):
                if s + prefetch < stop:
                    ahead.append(pool.submit(self.batch, s + prefetch))
                t0 = time.perf_counter()
                batch = ahead.popleft().result()  # a failure is raised here, at its step
                yield s, batch, time.perf_counter() - t0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """The train and validation sources (LMBlocks or ClassRows), plus what was learned on
    the way (label names, statistics)."""

    train: LMBlocks | ClassRows
    validation: LMBlocks | ClassRows | None
    labels: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document-level split by seed: (train, validation) indices, in order."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    return _held_out(n, max(1, int(round(n * fraction))), [seed, 7919])


def _held_out(n: int, n_val: int, key: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the rest, n_val indices drawn by key), each sorted."""
    perm = np.random.default_rng(key).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic document-level split by seed (the split `prepare` makes)."""
    train, val = split_indices(len(records), fraction, seed)
    return [records[i] for i in train], [records[i] for i in val]


def prepare(data, tokenizer, *, seq_len: int, seed: int, eos: int,
            labels: Sequence[str] = ()) -> Prepared:
    """Load, split, render and tokenize a DataSection into sources for the Batcher; the
    split and the block/row views index the cached tokens without reading them."""
    from .data import tokenize_task

    cache = data.cache_dir != "off"
    train_tok, hit = tokenize_task(data.train, data, tokenizer, cache=cache)
    all_tok = train_tok
    if data.validation:
        val_tok = tokenize_task(data.validation, data, tokenizer, cache=cache)[0]
    else:
        train_idx, val_idx = split_indices(len(train_tok), data.validation_fraction, seed)
        train_tok, val_tok = train_tok.select(train_idx), train_tok.select(val_idx)
    stats = {"cached": hit, "documents": len(train_tok),
             "bytes_per_token": train_tok.bytes_per_token()}
    if data.task == "classification":
        labels = tuple(labels) or tuple(data.labels) or _label_set(train_tok, data)
        train = _classification_rows(train_tok, data, labels, seq_len, eos)
        val = _classification_rows(val_tok, data, labels, seq_len, eos) if len(val_tok) else None
        rows = [r for r in (train, val) if r is not None]
        stats.update(train_examples=len(train), truncated=sum(r.truncated() for r in rows))
        if stats["truncated"]:
            print(f"gpt2jax: warning: {stats['truncated']} of {sum(map(len, rows))} records are "
                  f"longer than train.seq_len={seq_len} tokens and were cut "
                  f"({data.truncation} side dropped; see data.truncation)", file=sys.stderr)
        return Prepared(train, val, labels, stats)

    def blocks(tok: Tokenized) -> LMBlocks:
        return LMBlocks(tok, seq_len + 1, eos, segments=data.packing == "documents")

    train, val, split = blocks(train_tok), None, "none"
    if len(val_tok):
        try:
            val, split = blocks(val_tok), "file" if data.validation else "documents"
        except UserError:
            val = None  # too little validation text for one block
    if val is None and not data.validation and data.validation_fraction > 0:
        if len(val_tok):  # the held-out documents were too short: split all by blocks
            train_tok, train = all_tok, blocks(all_tok)
        train, val = split_blocks(train, data.validation_fraction, seed)
        split = "blocks" if val is not None else "none"
    stats.update(train_tokens=train_tok.n_tokens, train_blocks=len(train),
                 validation_split=split)
    return Prepared(train, val, (), stats)


def split_blocks(source, fraction: float, seed: int) -> tuple:
    """Split packed blocks by seed when there are too few documents to split by document:
    (train, validation or None), views of `source` (LMBlocks)."""
    n = len(source)
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 1:
        return source, None
    train, val = _held_out(n, n_val, [seed, 104729])
    return source.subset(train), source.subset(val)


def _label_set(tok, data) -> tuple[str, ...]:
    """The sorted label names of the training records (numerically when all are integers)."""
    values = set(tok.labels.tolist())
    if len(values) < 2:
        raise UserError(f"data {data.train}: column {data.label_column!r} has only "
                        f"{len(values)} distinct label(s) {sorted(values)}; classification "
                        "needs at least 2")
    ints = all(v.lstrip("-").isdigit() for v in values)
    return tuple(sorted(values, key=int) if ints else sorted(values))


def _classification_rows(tok, data, labels, seq_len: int, eos: int) -> ClassRows:
    """The rows of `tok` with label indices; every label must be in the label set."""
    index = {name: i for i, name in enumerate(labels)}
    for i, y in enumerate(tok.labels.tolist()):
        if y not in index:
            raise UserError(f"{tok.source}: row {int(tok.rows[i])} (counting from 0), column "
                            f"{data.label_column!r}: label {y!r} is not in the label set "
                            f"{list(labels)}; fix the row or data.labels")
    ys = np.asarray([index[y] for y in tok.labels.tolist()], np.int32)
    return ClassRows(tok, ys, seq_len, data.truncation, eos)
