"""Evaluation (perplexity, scoring, classification) against transformers' PyTorch, metric
math against hand-computed values, and data loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpt2jax.errors import UserError

SHORT_DOCS = [
    "The cat sat on the mat.",
    "机器学习是人工智能的一个分支。",
    "Emoji 👍 and numbers 12345, then a longer sentence to vary the lengths a bit.",
]
# About 120 GPT-2 tokens: longer than the tiny models' n_positions (64).
LONG_TEXT = " ".join(
    f"Line {i}: the {w} river runs past {n} old mills before it reaches the sea."
    for i, (w, n) in enumerate(zip(["green", "slow", "cold", "wide", "dark", "quiet", "long"],
                                   ["three", "seven", "nine", "two", "forty", "many", "few"]))
)


def torch_strided_nll(model, tok, texts, seq_len: int, stride: int) -> tuple[float, int]:
    """transformers' strided-perplexity loop, weighting each window by its scored tokens.

    Each text is <|endoftext|> + its tokens; a window's labels are -100 except the tokens
    after the previous window's end.
    """
    import torch

    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok.eos_token_id, *tok(text)["input_ids"]])
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_len, len(ids))
            window = ids[begin:end][None]
            labels = window.clone()
            labels[:, : window.shape[1] - (end - prev_end)] = -100
            with torch.no_grad():
                loss = model(window, labels=labels).loss
            n = int((labels[:, 1:] != -100).sum())
            nll, count = nll + float(loss) * n, count + n
            prev_end = end
            if end == len(ids):
                break
    return nll / count, count


@pytest.fixture(scope="module")
def hf_tok(hf_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_lm_dir[0]))


# ---------------------------------------------------------------- language modelling


def test_lm_windows_score_every_token_once():
    from gpt2jax.evaluate import lm_windows

    assert lm_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert lm_windows(3, 8, 4) == [(0, 3, 1)]
    assert lm_windows(1, 8, 4) == []  # an empty document: only <|endoftext|>, nothing to score
    for length, seq_len, stride in [(100, 16, 5), (64, 64, 32), (65, 64, 63), (7, 2, 1)]:
        windows = lm_windows(length, seq_len, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(1, length))
        assert all(end - begin <= seq_len for begin, end, _ in windows)
        # after the first window, each scored token sees at least seq_len - stride tokens
        assert all(first - begin == seq_len - stride for begin, _, first in windows[1:])
    with pytest.raises(UserError, match="stride"):
        lm_windows(10, 4, 4)


@pytest.mark.parametrize(
    "texts,args",
    [
        (SHORT_DOCS, []),
        ([LONG_TEXT], []),
        ([LONG_TEXT, SHORT_DOCS[0]], ["--seq-len", "40", "--stride", "13", "--batch-size", "3"]),
    ],
    ids=["short_docs", "long_text_default_stride", "long_text_seq40_stride13"],
)
def test_eval_perplexity_equals_transformers(cli, hf_lm_dir, hf_tok, tmp_path, texts, args):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = cli("eval", "--model", hf_lm_dir[0], "--data", data, "--json", *args)
    assert r.code == 0, r.err
    got = r.json
    seq_len = int(args[args.index("--seq-len") + 1]) if args else 64
    stride = int(args[args.index("--stride") + 1]) if args else 32
    ref_loss, ref_tokens = torch_strided_nll(hf_lm_dir[1], hf_tok, texts, seq_len, stride)
    assert got["task"] == "lm" and got["tokens"] == ref_tokens
    assert abs(got["perplexity"] / math.exp(ref_loss) - 1) <= 1e-4
    assert abs(got["loss"] - ref_loss) <= 1e-4 * ref_loss
    assert got["bytes_per_token"] == sum(len(t.encode()) for t in texts) / ref_tokens
    if texts == [LONG_TEXT]:
        assert ref_tokens > 64 + 32  # three windows of 64 tokens


def test_eval_result_does_not_depend_on_batching(hf_lm_dir):
    from gpt2jax.evaluate import evaluate_lm
    from gpt2jax.hf import load_hf_dir
    from gpt2jax.tokenizer import load_tokenizer

    model, tok = load_hf_dir(hf_lm_dir[0]), load_tokenizer(hf_lm_dir[0])
    a = evaluate_lm(model, tok, [LONG_TEXT, *SHORT_DOCS], batch_size=8)
    b = evaluate_lm(model, tok, [LONG_TEXT, *SHORT_DOCS], batch_size=5)
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= 1e-6


def test_eval_txt_paragraphs(cli, hf_lm_dir, hf_tok, tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("First paragraph,\nstill first.\n\nSecond one.\n")
    docs = ["First paragraph,\nstill first.", "Second one."]  # the splitting: test_load_records
    r = cli("eval", "--model", hf_lm_dir[0], "--data", data, "--text-unit", "paragraph", "--json")
    assert r.code == 0, r.err
    ref_loss, ref_tokens = torch_strided_nll(hf_lm_dir[1], hf_tok, docs, 64, 32)
    assert r.json["tokens"] == ref_tokens and r.json["documents"] == len(docs)
    assert abs(r.json["loss"] / ref_loss - 1) <= 1e-4


# ---------------------------------------------------------------- score


def _torch_answer_logprob(model, tok, prompt: str, answer: str) -> float:
    import torch

    p_ids = tok(prompt)["input_ids"] or [tok.eos_token_id]
    ids = torch.tensor([p_ids + tok(answer)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(len(p_ids), ids.shape[1]))


@pytest.mark.parametrize("prompt", ["Q: What is the capital of France?\nA:", ""])
def test_score_equals_transformers(cli, hf_lm_dir, hf_tok, prompt):
    answer = " Paris, of course."
    r = cli("score", "--model", hf_lm_dir[0], "--prompt", prompt, "--answer", answer, "--json")
    assert r.code == 0, r.err
    ref = _torch_answer_logprob(hf_lm_dir[1], hf_tok, prompt, answer)
    assert r.json["answer_tokens"] == len(hf_tok(answer)["input_ids"])
    assert abs(r.json["logprob"] - ref) <= 1e-4 * abs(ref)
    assert r.json["probability"] == pytest.approx(math.exp(r.json["logprob"]))


def test_score_rejects_empty_answer(hf_lm_dir):
    from gpt2jax.evaluate import score
    from gpt2jax.hf import load_hf_dir
    from gpt2jax.tokenizer import load_tokenizer

    with pytest.raises(UserError, match="answer is empty"):
        score(load_hf_dir(hf_lm_dir[0]), load_tokenizer(hf_lm_dir[0]), "prompt", "")


# ---------------------------------------------------------------- classification metrics


def test_metrics_by_hand():
    from gpt2jax.evaluate import classification_metrics, confusion_matrix, precision_recall_f1

    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 1]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 1, 1]]
    p, r, f1, support = precision_recall_f1(cm)
    assert np.allclose(p, [1 / 2, 2 / 4, 1 / 1])
    assert np.allclose(r, [1 / 2, 2 / 2, 1 / 3])
    assert np.allclose(f1, [0.5, 2 / 3, 0.5])
    assert support.tolist() == [2, 2, 3]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m["per_class"]["c"] == {"precision": 1.0, "recall": pytest.approx(1 / 3),
                                   "f1": 0.5, "support": 3}
    # a label that never occurs (true or predicted) has zeros and stays out of macro_f1
    m = classification_metrics([0, 1, 1], [0, 1, 0], ["x", "y", "unused"])
    assert m["per_class"]["unused"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_label_indices():
    from gpt2jax.evaluate import label_indices

    names = ("neg", "neu", "pos")
    values = ["pos", 0, "neu", 2.0, np.int64(1), "1"]
    assert label_indices(values, names).tolist() == [2, 0, 1, 2, 1, 1]
    assert label_indices(["1", "0"], ("1", "0")).tolist() == [0, 1]  # names win
    with pytest.raises(UserError, match=r"row 2 .*'positive'"):
        label_indices(["neg", "pos", "positive"], names)
    with pytest.raises(UserError, match="row 0"):
        label_indices([3], names)


def test_classification_eval_equals_transformers(cli, hf_cls_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from gpt2jax.evaluate import classification_metrics

    rows = [("a fine film", "pos"), ("dull and slow", 0), ("it was fine I guess", "neu"),
            (LONG_TEXT, 2), ("terrible", "neg")]
    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    preds = tmp_path / "out" / "predictions.jsonl"
    r = cli("eval", "--model", hf_cls_dir[0], "--data", data, "--text-column", "review",
            "--label-column", "sentiment", "--seq-len", "16", "--batch-size", "2",
            "--predictions", preds, "--json")
    assert r.code == 0, r.err
    # reference: transformers on each row alone, truncated to 16 tokens
    tok = AutoTokenizer.from_pretrained(str(hf_cls_dir[0]))
    names = ["neg", "neu", "pos"]
    probs = []
    for text, _ in rows:
        ids = torch.tensor([tok(text)["input_ids"][:16]])
        with torch.no_grad():
            probs.append(torch.softmax(hf_cls_dir[1](ids).logits[0], -1).numpy())
    y_true = [names.index(y) if isinstance(y, str) else y for _, y in rows]
    y_pred = [int(np.argmax(p)) for p in probs]
    got = r.json
    assert got["task"] == "classification" and got["examples"] == len(rows)
    expected = classification_metrics(y_true, y_pred, names)
    for key in ("accuracy", "macro_f1", "labels", "confusion_matrix", "per_class"):
        assert got[key] == expected[key], key
    lines = [json.loads(ln) for ln in preds.read_text().splitlines()]
    assert [ln["text"] for ln in lines] == [t for t, _ in rows]
    assert [ln["label"] for ln in lines] == [names[y] for y in y_true]
    assert [ln["predicted"] for ln in lines] == [names[y] for y in y_pred]
    for ln, p in zip(lines, probs, strict=True):
        assert np.abs(np.array([ln["probabilities"][n] for n in names]) - p).max() <= 1e-5


def test_classification_refuses_unknown_label(hf_cls_dir, tmp_path):
    from gpt2jax.evaluate import evaluate_data
    from gpt2jax.hf import load_hf_dir
    from gpt2jax.tokenizer import load_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "great"}\n')
    model = load_hf_dir(hf_cls_dir[0])
    with pytest.raises(UserError, match=r"row 1 .*'great'.*neg, neu, pos"):
        evaluate_data(model, load_tokenizer(hf_cls_dir[0]), str(data))


# ---------------------------------------------------------------- data loading


def test_load_records_formats(tmp_path):
    import datasets

    from gpt2jax.data import load_records

    rows = [{"text": "one", "label": "a"}, {"text": "two ü", "label": "b"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text,label\none,a\ntwo ü,b\n")
    (tmp_path / "d.tsv").write_text("text\tlabel\none\ta\ntwo ü\tb\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for ext in ("jsonl", "json", "csv", "tsv", "parquet"):
        ds = load_records(tmp_path / f"d.{ext}")
        assert ds.to_list() == rows, ext


def test_load_records_text_units_and_folders(tmp_path):
    from gpt2jax.data import load_records

    (tmp_path / "a.txt").write_text("l1\nl2\n\n\n  \np2 line\n")
    assert load_records(tmp_path / "a.txt")["text"] == ["l1\nl2\n\n\n  \np2 line\n"]
    assert load_records(tmp_path / "a.txt", text_unit="line")["text"] == ["l1", "l2", "p2 line"]
    assert load_records(tmp_path / "a.txt", text_unit="paragraph")["text"] == ["l1\nl2", "p2 line"]
    corpus = tmp_path / "corpus"
    for split, n in (("train", 3), ("test", 1)):
        (corpus / split).mkdir(parents=True)
        for i in range(n):
            (corpus / split / f"{i}.txt").write_text(f"{split} doc {i}")
    (corpus / ".hidden.txt").write_text("never read")
    assert len(load_records(corpus)) == 4
    assert load_records(corpus, split="test")["text"] == ["test doc 0"]
    with pytest.raises(UserError, match=r"no 'validation' split \(splits found: test, train\)"):
        load_records(corpus, split="validation")


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.jsonl", b"", "is empty"),
        ("latin1.txt", "café".encode("latin-1"), r"latin1.txt is not UTF-8 .*offset 3"),
        ("latin1.csv", "text\ncafé\n".encode("latin-1"), r"latin1.csv is not UTF-8"),
        ("notes.docx", b"binary", r"notes.docx: unsupported data file extension '.docx'"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": ', r"cannot read .*broken.jsonl as json"),
        ("blank.txt", b"\n \n", r"blank.txt holds no records"),
    ],
)
def test_load_records_errors_name_the_file(tmp_path, name, content, match):
    from gpt2jax.data import load_records

    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_records(tmp_path / name)


def test_load_records_missing_hub_offline_and_columns(tmp_path):
    from gpt2jax.data import load_records, parse_hub_spec, require_column

    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    assert parse_hub_spec("hub:org/name:cfg@test").__dict__ == {
        "name": "org/name", "config": "cfg", "split": "test"}
    assert parse_hub_spec("hub:imdb@train").split == "train"
    with pytest.raises(UserError, match="bad hub dataset"):
        parse_hub_spec("hub:org/name@")
    with pytest.raises(UserError, match="offline"):
        load_records("hub:gpt2jax-test/no-such-dataset@train")
    (tmp_path / "d.csv").write_text("review,stars\ngood,5\n")
    ds = load_records(tmp_path / "d.csv")
    with pytest.raises(UserError, match="no column 'text'; its columns are: review, stars"):
        require_column(ds, "text", "d.csv")


def test_reverse_dictionary_skips_prompts_too_long_and_limits(cli, hf_lm_dir, tmp_path):
    """A definition longer than the context leaves no room to generate: it is skipped and
    counted (not 'lower --max-new-tokens to at most -576'); --limit takes the first N."""
    rows = [{"word": "stone", "definition": "a small rock"},
            {"word": "river", "definition": "water " * 2000},
            {"word": "light", "definition": "what lets you see"}]
    data = tmp_path / "dict.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("eval", "--model", hf_lm_dir[0], "--data", data, "--task", "dictionary_reverse")
    res = cli(*args, "--json")
    assert res.code == 0, res.err
    assert (res.json["examples"], res.json["skipped"]) == (2, 1)
    assert "skipped 1 of 3 records whose prompt is longer than" in res.err
    res = cli(*args, "--limit", "1", "--json")
    assert res.code == 0 and (res.json["examples"], res.json["skipped"]) == (1, 0)
