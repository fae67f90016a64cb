"""Data preparation: tokenize once (cached), deterministic splits, bad-data messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2jax import data as data_mod
from gpt2jax.batches import prepare, split_records
from gpt2jax.config import DataSection
from gpt2jax.data import tokenize_task
from gpt2jax.errors import UserError
from gpt2jax.tokenizer import gpt2_tokenizer

EOS = 50256
WORDS = "river stone light quiet morning harbor engine garden window paper".split()


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) + f" {i}." for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _data(tmp: Path, train: Path, **kw) -> DataSection:
    return DataSection(train=str(train), **{"cache_dir": str(tmp / "cache"), **kw})


def test_tokenize_task_matches_the_tokenizer_and_reports_bytes_per_token(tmp_path, tok):
    texts = _texts(5) + ["naïve café", "床前明月光"]
    src = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    out, hit = tokenize_task(str(src), _data(tmp_path, src), tok)
    assert not hit and len(out) == len(texts)
    expected = tok(texts, add_special_tokens=False)["input_ids"]
    assert [out.record(i).tolist() for i in range(len(out))] == expected
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert out.bytes_per_token() == pytest.approx(n_bytes / sum(map(len, expected)))
    assert out.rows.tolist() == list(range(len(texts)))


def test_repeated_run_reads_the_cache_and_a_changed_file_is_tokenized_again(
        tmp_path, tok, monkeypatch):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _texts(20)])
    d = _data(tmp_path, src, task="lm")
    first = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    assert first.stats["cached"] is False
    assert list((tmp_path / "cache" / "tokenized").glob("*/meta.json"))

    def refuse(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(data_mod, "tokenize_dataset", refuse)
    second = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    assert second.stats["cached"] is True
    for k in ("tokens", "weights"):
        np.testing.assert_array_equal(first.train.arrays()[k], second.train.arrays()[k])
        np.testing.assert_array_equal(first.validation.arrays()[k],
                                      second.validation.arrays()[k])
    # the cache is memory-mapped, not read into memory
    assert isinstance(second.train.tok.ids, np.memmap)
    # another seq_len reuses the tokens too (packing is redone, not tokenizing)
    assert prepare(d, tok, seq_len=8, seed=0, eos=EOS).stats["cached"] is True
    _jsonl(src, [{"text": t} for t in _texts(21)])  # the file changed: the key changes
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    monkeypatch.undo()
    # another template is another key as well
    other = prepare(_data(tmp_path, src, task="lm", prompt_template="T: {text}"), tok,
                    seq_len=16, seed=0, eos=EOS)
    assert other.stats["cached"] is False


def test_split_by_documents_is_deterministic_by_seed_and_disjoint(tmp_path, tok):
    texts = _texts(40)
    src = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    d = _data(tmp_path, src, validation_fraction=0.25, cache_dir="off")
    a = prepare(d, tok, seq_len=16, seed=3, eos=EOS)
    b = prepare(d, tok, seq_len=16, seed=3, eos=EOS)
    c = prepare(d, tok, seq_len=16, seed=4, eos=EOS)
    assert a.stats["validation_split"] == "documents" and a.stats["documents"] == 30
    np.testing.assert_array_equal(a.validation.arrays()["tokens"], b.validation.arrays()["tokens"])
    assert a.validation.arrays()["tokens"].shape != c.validation.arrays()["tokens"].shape or \
        (a.validation.arrays()["tokens"] != c.validation.arrays()["tokens"]).any()
    # the held-out documents are exactly split_records' validation records
    train_records, val_records = split_records([{"text": t} for t in texts], 0.25, 3)
    assert len(val_records) == 10
    train_stream = tok.decode(np.concatenate([blk[1:] for blk in a.train.arrays()["tokens"]]))
    val_stream = tok.decode(np.concatenate([blk[1:] for blk in a.validation.arrays()["tokens"]]))
    for r in val_records:
        assert r["text"] not in train_stream
    assert train_records[0]["text"] in train_stream and val_records[0]["text"] in val_stream


def test_a_single_document_is_split_by_packed_blocks(tmp_path, tok):
    src = tmp_path / "one.txt"
    src.write_text(" ".join(_texts(30)))
    d = _data(tmp_path, src, validation_fraction=0.2, cache_dir="off")
    p = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    assert p.stats["validation_split"] == "blocks" and p.stats["documents"] == 1
    train, val = p.train.arrays()["tokens"], p.validation.arrays()["tokens"]
    n_train, n_val = len(train), len(val)
    assert n_val == round((n_train + n_val) * 0.2)
    rows = {tuple(r) for r in np.concatenate([train, val])}
    assert len(rows) == n_train + n_val  # no block is in both splits
    again = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    np.testing.assert_array_equal(val, again.validation.arrays()["tokens"])


# ---------------------------------------------------------------- bad data


def _cls(tmp: Path, train: Path, **kw) -> DataSection:
    return DataSection(train=str(train), task="classification", cache_dir="off", **kw)


def test_empty_dataset_and_missing_column_name_the_file(tmp_path, tok):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(UserError, match=r"empty\.csv.*no records"):
        prepare(_cls(tmp_path, empty), tok, seq_len=16, seed=0, eos=EOS)
    src = tmp_path / "cols.csv"
    src.write_text("body,label\nhello,a\nworld,b\n")
    with pytest.raises(UserError, match=r"cols\.csv has no column 'text'.*body, label"):
        prepare(_cls(tmp_path, src), tok, seq_len=16, seed=0, eos=EOS)
    dic = _jsonl(tmp_path / "dic.jsonl", [{"word": "a", "meaning": "b"}])
    with pytest.raises(UserError, match=r"dic\.jsonl has no column 'definition'"):
        prepare(_data(tmp_path, dic, task="dictionary_forward", cache_dir="off"), tok,
                seq_len=16, seed=0, eos=EOS)


def test_bad_rows_name_file_row_and_column(tmp_path, tok):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nsunny day,pos\nrainy day,neg\ncold night,neg\n")
    val = tmp_path / "val.csv"
    val.write_text("text,label\nwarm,pos\nfoggy,meh\n")
    with pytest.raises(UserError, match=r"val\.csv: row 1 .*column 'label': label 'meh' is "
                                        r"not in the label set \['neg', 'pos'\]"):
        prepare(_cls(tmp_path, train, validation=str(val)), tok, seq_len=16, seed=0, eos=EOS)
    holes = _jsonl(tmp_path / "holes.jsonl", [{"text": "fine"}, {"text": None}])
    with pytest.raises(UserError, match=r"holes\.jsonl: row 1 .*column 'text' holds None"):
        prepare(_data(tmp_path, holes, cache_dir="off"), tok, seq_len=4, seed=0, eos=EOS)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt is not UTF-8 text .*offset 3"):
        prepare(_data(tmp_path, latin, cache_dir="off"), tok, seq_len=4, seed=0, eos=EOS)


def test_truncation_side_and_the_warning_count(tmp_path, tok, capsys):
    long = " ".join(f"w{i}" for i in range(40))
    src = tmp_path / "t.csv"
    src.write_text(f"text,label\n{long},a\nshort,b\n{long} end,a\nok,b\n")
    right = prepare(_cls(tmp_path, src, validation_fraction=0.0), tok, seq_len=8, seed=0,
                    eos=EOS)
    assert "2 of 4 records are longer than train.seq_len=8" in capsys.readouterr().err
    assert right.stats["truncated"] == 2
    left = prepare(_cls(tmp_path, src, validation_fraction=0.0, truncation="left"), tok,
                   seq_len=8, seed=0, eos=EOS)
    ids = tok(long)["input_ids"]
    assert right.train.row(0).tolist() == ids[:8] and left.train.row(0).tolist() == ids[-8:]
    assert right.train.row(1).tolist() == left.train.row(1).tolist() == tok("short")["input_ids"]
    assert right.labels == ("a", "b") and right.train.labels.tolist() == [0, 1, 0, 1]


def test_classification_records_round_trip_through_the_cache(tmp_path, tok):
    src = tmp_path / "c.csv"
    src.write_text("text,label\n" + "".join(f"item {i},{'xyz'[i % 3]}\n" for i in range(12)))
    d = DataSection(train=str(src), task="classification", validation_fraction=0.25,
                    cache_dir=str(tmp_path / "cache"))
    first = prepare(d, tok, seq_len=8, seed=1, eos=EOS)
    second = prepare(d, tok, seq_len=8, seed=1, eos=EOS)
    assert (first.stats["cached"], second.stats["cached"]) == (False, True)
    assert first.labels == second.labels == ("x", "y", "z")
    for split in ("train", "validation"):
        a, b = getattr(first, split), getattr(second, split)
        assert [a.row(i).tolist() for i in range(len(a))] == \
            [b.row(i).tolist() for i in range(len(b))]
        np.testing.assert_array_equal(a.labels, b.labels)
    assert len(first.validation.labels) == 3 and len(first.train.labels) == 9


def _hub_dir(root: Path, splits: dict[str, list[str]]) -> Path:
    """A dataset directory as the hub lays one out: data/SPLIT-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        table = pa.table({"text": texts, "label": [i % 2 for i in range(len(texts))]})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_cache_is_keyed_by_the_datasets_fingerprint(tmp_path, tok):
    """`hub:DIR` goes through datasets.load_dataset itself (offline: a local dataset
    directory in the hub's layout). Rewriting its file changes the loaded dataset's
    fingerprint, as a new revision on the hub does, and with it the tokenized cache."""
    versions = {"v1": _texts(12), "v2": _texts(12, seed=1, words=14)}
    root = _hub_dir(tmp_path / "corpus", {"train": versions["v1"]})
    d = _data(tmp_path, Path("unused"), validation_fraction=0.0)
    d.train = f"hub:{root}@train"
    first = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    assert first.stats["cached"] is False
    assert tok.decode(first.train.arrays()["tokens"][0]).startswith(
        "<|endoftext|>" + versions["v1"][0])
    assert prepare(d, tok, seq_len=16, seed=0, eos=EOS).stats["cached"] is True
    _hub_dir(root, {"train": versions["v2"]})  # the copy changed under the same name
    changed = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    assert changed.stats["cached"] is False
    stream = tok.decode(changed.train.arrays()["tokens"][0])
    assert versions["v2"][0] in stream and versions["v1"][0] not in stream


def test_hub_splits_and_configs_through_datasets(tmp_path):
    """The DatasetDict branches with datasets' real loader: a named split, the only
    split, several splits without a choice, a config from the README's `configs:`, and an
    unknown split or config (reported as such, not as the hub being offline)."""
    from gpt2jax.data import load_records

    two = _hub_dir(tmp_path / "two", {"train": ["a b", "c d", "e"], "test": ["x", "y"]})
    got = load_records(f"hub:{two}@test")
    assert got["text"] == ["x", "y"] and got.column_names == ["text", "label"]
    assert load_records(f"hub:{two}", split="train")["text"] == ["a b", "c d", "e"]
    with pytest.raises(UserError, match=rf"hub:{two} has splits (train, test|test, train); "
                                        rf"pick one with hub:{two}@SPLIT"):
        load_records(f"hub:{two}")
    with pytest.raises(UserError, match=r"Unknown split \"validation\".*check the name, config "
                                        r"and split$"):
        load_records(f"hub:{two}@validation")
    one = _hub_dir(tmp_path / "one", {"train": ["only", "split"]})
    assert load_records(f"hub:{one}")["text"] == ["only", "split"]

    cfg = tmp_path / "configs"
    (cfg / "big").mkdir(parents=True)
    (cfg / "README.md").write_text(
        "---\nconfigs:\n- config_name: big\n  data_files:\n  - split: train\n"
        "    path: big/train.jsonl\n  - split: test\n    path: big/test.jsonl\n---\n")
    _jsonl(cfg / "big" / "train.jsonl", [{"text": "b1"}, {"text": "b2"}])
    _jsonl(cfg / "big" / "test.jsonl", [{"text": "t1"}])
    assert load_records(f"hub:{cfg}:big@test")["text"] == ["t1"]
    with pytest.raises(UserError, match=rf"hub:{cfg}:big has splits .*hub:{cfg}:big@SPLIT"):
        load_records(f"hub:{cfg}:big")
    with pytest.raises(UserError, match=r"BuilderConfig 'small' not found"):
        load_records(f"hub:{cfg}:small@train")


def test_prepare_command_tokenizes_once_and_reports_what_train_will_see(tmp_path, tok, cli):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _texts(30)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {src}, cache_dir: {tmp_path / 'cache'}}}\n"
                   f"train: {{seq_len: 16, run_dir: {tmp_path / 'run'}}}\n")
    first = cli("prepare", cfg, "--data.validation_fraction=0.2", "--json")
    assert first.code == 0, first.err
    second = cli("prepare", cfg, "--data.validation_fraction=0.2", "--json")
    assert (first.json["cached"], second.json["cached"]) == (False, True)
    direct = prepare(_data(tmp_path, src, validation_fraction=0.2), tok, seq_len=16, seed=0,
                     eos=EOS)
    assert direct.stats["cached"] is True  # train would read the cache `prepare` wrote
    assert second.json["train_blocks"] == len(direct.train) > 0
    assert second.json["validation_blocks"] == len(direct.validation) > 0
    assert second.json["documents"] == 24 and not (tmp_path / "run").exists()
    bad = cli("prepare", cfg, f"--data.train={tmp_path / 'missing.jsonl'}")
    assert bad.code == 2 and "missing.jsonl" in bad.last_err


def test_a_torn_cache_is_rebuilt_with_a_warning(tmp_path, tok, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _texts(20)])
    d = _data(tmp_path, src, validation_fraction=0.0)
    first = prepare(d, tok, seq_len=16, seed=0, eos=EOS).train.arrays()["tokens"]
    (ids,) = (tmp_path / "cache" / "tokenized").glob("*/ids.npy")
    ids.write_bytes(ids.read_bytes()[:200])  # a crash or a full disk cut the file short
    again = prepare(d, tok, seq_len=16, seed=0, eos=EOS)
    assert again.stats["cached"] is False and "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(again.train.arrays()["tokens"], first)
    assert prepare(d, tok, seq_len=16, seed=0, eos=EOS).stats["cached"] is True


def test_temporary_folders_of_killed_runs_are_removed_after_a_day(tmp_path, tok):
    import os
    import time

    root = tmp_path / "cache" / "tokenized"
    old, fresh = root / ".abc.killed", root / ".def.running"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "map.arrow").write_bytes(b"x" * 100)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    src = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _texts(10)])
    assert prepare(_data(tmp_path, src), tok, seq_len=16, seed=0, eos=EOS).stats["cached"] is False
    assert not old.exists() and fresh.exists()
