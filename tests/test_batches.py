"""Packing and the deterministic, process-independent, resumable batch order."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2jax.batches import Batcher, ClassRows, LMBlocks, bucket, pad_rows, split_blocks
from gpt2jax.data import Tokenized
from gpt2jax.errors import UserError

EOS = 50256


def tokenized(token_lists, weights=None, labels=None) -> Tokenized:
    """In-memory records from lists of token ids (and per-token weights, labels)."""
    lengths = np.asarray([len(t) for t in token_lists], np.int64)
    flat = lambda xs, dt: np.asarray([v for x in xs for v in x], dt)  # noqa: E731
    return Tokenized(ids=flat(token_lists, np.int32), starts=np.cumsum(lengths) - lengths,
                     lengths=lengths, nbytes=lengths.copy(), rows=np.arange(len(lengths)),
                     weights=None if weights is None else flat(weights, np.uint8),
                     labels=None if labels is None else np.asarray(labels, str))


def _docs(n: int = 9, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, rng.integers(1, 30)).tolist() for _ in range(n)]


def _blocks(docs, block, masks=None) -> dict:
    return LMBlocks(tokenized(docs, masks), block, EOS).arrays()


def test_pack_makes_every_token_a_target_exactly_once():
    docs = _docs()
    docs[3] = docs[-1] = []  # an empty document is just its EOS, also the last one
    block = 9
    got = _blocks(docs, block)
    tokens, weights = got["tokens"], got["weights"]
    stream = np.concatenate([[EOS, *d] for d in docs])
    assert tokens.shape[1] == block and weights.shape == tokens.shape
    # Blocks overlap by one token: the inputs/targets of consecutive blocks tile the stream.
    targets = np.concatenate([b[1:] for b in tokens])
    n = len(targets)
    assert n == len(tokens) * (block - 1) and len(stream) - block < n <= len(stream) - 1
    np.testing.assert_array_equal(targets, stream[1: n + 1])
    np.testing.assert_array_equal(tokens[:, 0], stream[np.arange(len(tokens)) * (block - 1)])
    assert (weights == 1).all() and tokens.dtype == np.int32


def test_pack_applies_loss_masks_and_rejects_too_little_data():
    docs = [[1, 2, 3], [4, 5]]
    masks = [[0, 1, 1], [0, 1]]
    weights = _blocks(docs, 3, masks)["weights"]
    stream_w = np.array([1, 0, 1, 1, 1, 0, 1], np.float32)
    np.testing.assert_array_equal(weights[:, 1:].ravel(), stream_w[1: 1 + weights[:, 1:].size])
    with pytest.raises(UserError, match="fewer than one block"):
        _blocks([[1, 2]], 8)
    assert len(tokenized([])) == 0
    with pytest.raises(UserError, match="holds 0 tokens"):
        LMBlocks(tokenized([]), 8, EOS)


class _Recording:
    """An ids array that records which positions were read."""

    def __init__(self, ids):
        self.ids, self.read = ids, set()

    def __getitem__(self, idx):
        self.read.update(np.asarray(idx).ravel().tolist())
        return self.ids[idx]

    def __len__(self):
        return len(self.ids)


def test_blocks_are_read_on_demand_from_a_memory_map_and_a_process_reads_only_its_rows(
        tmp_path):
    docs = _docs(n=200, seed=1)
    full = _blocks(docs, 17)
    tok = tokenized(docs)
    np.save(tmp_path / "ids.npy", tok.ids.astype(np.uint16))
    tok.ids = np.load(tmp_path / "ids.npy", mmap_mode="r")
    mapped = LMBlocks(tok, 17, EOS)
    np.testing.assert_array_equal(mapped.take(np.array([5, 0, 9]))["tokens"],
                                  full["tokens"][[5, 0, 9]])
    # two processes: each reads the tokens of its half of the global batch and no others
    seen = []
    for i in range(2):
        tok.ids = _Recording(np.load(tmp_path / "ids.npy"))
        b = Batcher(LMBlocks(tok, 17, EOS), 8, seed=4, process_index=i, process_count=2)
        part = b.batch(3)
        mine = b.global_indices(3)[i * 4: (i + 1) * 4]
        np.testing.assert_array_equal(part["tokens"], full["tokens"][mine])
        # the ids positions of this process's blocks (stream position p of document i
        # is ids[p - i - 1]; a document's EOS is not stored)
        stream_pos = (mine[:, None] * 16 + np.arange(17)).ravel()
        spans = np.array([len(d) + 1 for d in docs])
        starts = np.cumsum(spans) - spans
        doc = np.searchsorted(starts, stream_pos, side="right") - 1
        expected = {int(p - i - 1) for p, i in zip(stream_pos, doc) if p != starts[i]}
        assert tok.ids.read == expected
        seen.append(tok.ids.read)
    # no token read by both processes but for blocks that touch (one shared token each)
    assert len(seen[0] & seen[1]) <= 1
    train, val = split_blocks(mapped, 0.25, seed=0)
    assert isinstance(train, LMBlocks) and len(train) + len(val) == len(mapped)
    np.testing.assert_array_equal(val.arrays()["tokens"][0], full["tokens"][val.index[0]])


class Arrays(dict):
    """A batch source over equally indexed in-memory arrays (name -> (N, ...)): rows are
    easy to predict, so the order tests check indices against them."""

    def __len__(self) -> int:
        return len(next(iter(self.values())))

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v[idx]) for k, v in self.items()}

    def subset(self, idx: np.ndarray) -> Arrays:
        return Arrays({k: v[idx] for k, v in self.items()})


def _lm_arrays(n: int = 37, width: int = 5) -> Arrays:
    tokens = np.arange(n * width, dtype=np.int32).reshape(n, width)
    return Arrays({"tokens": tokens, "weights": np.ones_like(tokens, np.float32)})


@pytest.mark.parametrize("step", [0, 3, 11])
@pytest.mark.parametrize("accum", [1, 2, 4])
def test_micro_batches_do_not_depend_on_process_count(step, accum):
    """Each process reshapes its rows to (accum, rows, ...) and the trainer joins the
    processes' slices along the rows axis: micro-batch i must be global positions
    i*B/A ... (i+1)*B/A-1 of the step whatever the number of processes."""
    arrays = _lm_arrays()
    idx = Batcher(arrays, 8, seed=5).global_indices(step)
    expected = arrays["tokens"][idx].reshape(accum, 8 // accum, -1)
    for count in (1, 2) if accum == 4 else (1, 2, 4):
        parts = [Batcher(arrays, 8, seed=5, process_index=i, process_count=count,
                         accum=accum).batch(step)["tokens"] for i in range(count)]
        assert all(len(p) == 8 // count for p in parts)
        joined = np.concatenate([p.reshape(accum, 8 // (accum * count), -1) for p in parts],
                                axis=1)
        np.testing.assert_array_equal(joined, expected, err_msg=f"{count} processes")


def test_order_is_a_permutation_per_epoch_and_depends_on_seed():
    arrays = _lm_arrays(n=32)
    b = Batcher(arrays, 8, seed=1)
    assert b.steps_per_epoch() == 4
    epoch0 = np.concatenate([b.global_indices(s) for s in range(4)])
    epoch1 = np.concatenate([b.global_indices(s) for s in range(4, 8)])
    assert sorted(epoch0) == list(range(32)) and sorted(epoch1) == list(range(32))
    assert (epoch0 != epoch1).any()  # reshuffled every epoch
    other = Batcher(arrays, 8, seed=2)
    assert (np.concatenate([other.global_indices(s) for s in range(4)]) != epoch0).any()


def test_resuming_at_a_step_gives_the_same_batches_as_iterating_from_zero():
    arrays = _lm_arrays()
    full = [(s, b["tokens"]) for s, b, _ in Batcher(arrays, 4, seed=3).iterate(0, 12)]
    resumed = [(s, b["tokens"]) for s, b, _ in Batcher(arrays, 4, seed=3).iterate(7, 12)]
    assert [s for s, _ in full] == list(range(12))
    assert [s for s, _ in resumed] == list(range(7, 12))
    for (s, a), (t, b) in zip(full[7:], resumed, strict=True):
        assert s == t
        np.testing.assert_array_equal(a, b)


def test_classification_batches_pad_to_one_bucket_for_all_processes():
    rows = [[1] * n for n in (3, 20, 5, 7, 2, 40, 9, 1)]
    arrays = ClassRows(tokenized(rows), np.arange(8) % 3, 64, "right", EOS)
    per_process = [Batcher(arrays, 8, seed=0, process_index=i, process_count=2, pad_id=EOS,
                           max_len=64).batch(0) for i in range(2)]
    # The longest row of the global batch (40) sets the bucket on both processes.
    assert {p["input_ids"].shape for p in per_process} == {(4, 64)}
    idx = Batcher(arrays, 8, seed=0).global_indices(0)
    labels = np.concatenate([p["labels"] for p in per_process])
    np.testing.assert_array_equal(labels, arrays.labels[idx])
    lengths = np.concatenate([p["attention_mask"].sum(1) for p in per_process])
    np.testing.assert_array_equal(lengths, [len(rows[i]) for i in idx])
    assert bucket(17, 64) == 32 and bucket(3, 64) == 16 and bucket(100, 64) == 64
    ids, mask = pad_rows([[7, 8, 9]], 2, EOS)  # truncates to the length
    assert ids.tolist() == [[7, 8]] and mask.tolist() == [[1, 1]]


def test_batch_size_must_divide_by_processes_and_block_split_is_disjoint():
    with pytest.raises(UserError, match="not divisible"):
        Batcher(_lm_arrays(), 6, seed=0, process_count=4)
    with pytest.raises(UserError, match=r"batch_size=8 is not divisible by train.grad_accum=4 x "
                                        r"4 processes"):
        Batcher(_lm_arrays(), 8, seed=0, process_count=4, accum=4)
    arrays = _lm_arrays(n=20)
    train, val = split_blocks(arrays, 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15
    rows = {tuple(r) for r in np.concatenate([train["tokens"], val["tokens"]])}
    assert len(rows) == 20
