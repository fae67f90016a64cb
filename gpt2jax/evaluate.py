"""Evaluation: per-token log-probabilities, LM perplexity, answer scoring, classification.

The Python API behind `gpt2jax eval` and `gpt2jax score`:

    model, tok, _ = load_model("path/to/hf_dir")
    evaluate_lm(model, tok, ["some text", ...])        # loss, perplexity, tokens, bytes_per_token
    score(model, tok, "Q: 2+2? A:", " 4")              # logprob, probability, answer_tokens
    evaluate_classification(model, tok, texts, labels)  # accuracy, macro_f1, per_class, ...

Batches have one fixed shape (padded rows and columns, masked) so each evaluation
compiles once. The metric math lives in pure functions (lm_windows, confusion_matrix,
precision_recall_f1, classification_metrics) that tests check by hand.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .batches import pad_rows
from .errors import UserError
from .model import GPT2
from .tokenizer import encode, eos_id

TASKS = ("lm", "classification", "dictionary_reverse")

# ---------------------------------------------------------------- forwards


@nnx.jit
def token_logprobs(model: GPT2, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Jitted (B, T) next-token log-probabilities (natural log) under the tied LM head.

    Entry t is log p(input_ids[t] | input_ids[:t]); it is 0 at t = 0 (no context) and
    where attention_mask is 0. Rows are right-padded. Works for every head.
    """
    h, _ = model.hidden_states(input_ids, attention_mask)
    # the model's LM loss (chunked by model.loss_chunk: no full (B, T, vocab) logits)
    lp = jnp.pad(-model.token_nll(h[:, :-1], input_ids[:, 1:]), ((0, 0), (1, 0)))
    return jnp.where(attention_mask.astype(bool), lp, 0.0)


@nnx.jit
def class_probabilities(model: GPT2, input_ids: jax.Array, attention_mask: jax.Array):
    """Jitted (B, num_labels) softmax of a classification head's logits."""
    return jax.nn.softmax(model(input_ids, attention_mask), axis=-1)


def batched(fn: Callable, model: GPT2, rows: list[list[int]], pad: int,
             batch_size: int, length: int = 0) -> np.ndarray:
    """fn(model, ids, mask) over the rows, right padded (to `length`, else the longest row)
    and batch_size at a time in one shape (one compile); the outputs of the real rows."""
    length = length or max([1, *map(len, rows)])  # one column even when every row is empty
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, mask = pad_rows(batch, length, pad, batch_size)
        out.append(np.asarray(fn(model, ids, mask))[:len(batch)])
    return np.concatenate(out)


# ---------------------------------------------------------------- argument checks


def context_length(model: GPT2, seq_len: int | None) -> int:
    """The window length: --seq-len, at most the model's n_positions (the default)."""
    n_positions = model.cfg.n_positions
    if seq_len is None:
        return n_positions
    if not 2 <= seq_len <= n_positions:
        raise UserError(
            f"--seq-len {seq_len} must be between 2 and the model's n_positions ({n_positions})")
    return seq_len


def check_stride(stride: int, seq_len: int) -> None:
    """A window must keep at least one token of context for the first token it scores."""
    if not 1 <= stride < seq_len:
        raise UserError(f"--stride {stride} must be at least 1 and below --seq-len {seq_len}")


def _checked(model: GPT2, task: str, batch_size: int, seq_len: int | None = None,
             stride: int | None = None) -> tuple[int | None, int | None]:
    """The arguments of an lm or classification evaluation, checked before any work, with
    their defaults (seq_len: n_positions; lm stride: seq_len // 2)."""
    if task == "classification" and model.cfg.head == "lm":
        raise UserError(
            "this model has an LM head only; classification needs a model with a "
            "classification head (use --task lm for perplexity)")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if task not in ("lm", "classification"):
        return seq_len, stride
    seq_len = context_length(model, seq_len)
    if task == "lm":
        stride = seq_len // 2 if stride is None else stride
        check_stride(stride, seq_len)
    return seq_len, stride


# ---------------------------------------------------------------- language modelling


def lm_windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_scored) that score tokens 1..length-1 exactly once.

    Token 0 (the <|endoftext|> prefix) has no context and is never scored. Windows hold
    at most seq_len tokens and start `stride` apart; each scores the tokens after the
    previous window's end, so every token is scored once with the most context its
    window gives (at least seq_len - stride tokens once the first window is full).
    """
    check_stride(stride, seq_len)
    windows: list[tuple[int, int, int]] = []
    begin, prev_end = 0, 1
    while prev_end < length:
        end = min(begin + seq_len, length)
        windows.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return windows


def evaluate_lm(model: GPT2, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
                seq_len: int | None = None, stride: int | None = None) -> dict:
    """Mean NLL per token (natural log), perplexity, tokens scored and UTF-8 bytes per token.

    Each document is scored as <|endoftext|> + its tokens, so its first token counts too.
    Longer documents are scored in windows of seq_len (default n_positions) that advance
    by stride (default seq_len // 2); see lm_windows.
    """
    seq_len, stride = _checked(model, "lm", batch_size, seq_len, stride)
    texts = list(texts)
    eos = eos_id(tokenizer, model.cfg.eos_token_id)
    docs = [[eos, *ids] for ids in encode(tokenizer, texts, model.cfg.vocab_size)]
    tokens = sum(len(ids) - 1 for ids in docs)
    if tokens == 0:
        raise UserError("the data has no text to score (all documents are empty)")
    # (document, begin, end, first scored): all windows of all documents, batched together
    work = [(d, *w) for d, ids in enumerate(docs) for w in lm_windows(len(ids), seq_len, stride)]
    length = max(e - b for _, b, e, _ in work)
    total, group = 0.0, 64 * batch_size  # windows in memory at a time
    for g in range(0, len(work), group):
        part = work[g:g + group]
        lp = batched(token_logprobs, model, [docs[d][b:e] for d, b, e, _ in part], eos,
                     batch_size, length)
        total += sum(float(lp[i, first - b:e - b].astype(np.float64).sum())
                     for i, (_, b, e, first) in enumerate(part))
    loss = -total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "bytes_per_token": sum(len(t.encode("utf-8")) for t in texts) / tokens,
        "documents": len(docs),
    }


def score(model: GPT2, tokenizer, prompt: str, answer: str) -> dict:
    """log p(answer | prompt) for ids = tok(prompt) + tok(answer), nothing inserted.

    An empty prompt scores the answer after a single <|endoftext|> (its only possible
    context). Returns logprob (natural log, summed over the answer's tokens), probability
    (exp of logprob), answer_tokens and prompt_tokens.
    """
    if not answer:
        raise UserError("the answer is empty; pass the text to score with --answer")
    p_ids, a_ids = encode(tokenizer, [prompt, answer], model.cfg.vocab_size)
    if not p_ids:
        p_ids = [eos_id(tokenizer, model.cfg.eos_token_id)]
    ids = p_ids + a_ids
    if len(ids) > model.cfg.n_positions:
        raise UserError(
            f"prompt + answer are {len(ids)} tokens but the model's context is "
            f"{model.cfg.n_positions}; shorten the prompt")
    arr = np.asarray([ids], np.int32)
    lp = np.asarray(token_logprobs(model, arr, np.ones_like(arr)))[0]
    logprob = float(lp[len(p_ids):].astype(np.float64).sum())
    return {"logprob": logprob, "probability": math.exp(logprob),
            "answer_tokens": len(a_ids), "prompt_tokens": len(p_ids)}


# ---------------------------------------------------------------- classification metrics


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: rows are true classes, columns predictions."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix.

    A ratio with a zero denominator is 0 (scikit-learn's zero_division=0).
    """
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict:
    """accuracy, macro_f1, labels, per_class and confusion_matrix (rows = true labels).

    macro_f1 averages F1 over the labels that occur in the data or the predictions, as
    scikit-learn does when it is not given the label list.
    """
    cm = confusion_matrix(y_true, y_pred, len(labels))
    precision, recall, f1, support = precision_recall_f1(cm)
    seen = (support > 0) | (cm.sum(0) > 0)
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "labels": list(labels),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
    }


def plot_confusion_matrix(cm, labels: Sequence[str], path: str | Path) -> Path:
    """A PNG of the confusion matrix (rows true labels, columns predictions, counts)."""
    from .tracking import figure

    cm = np.asarray(cm)
    n = len(labels)
    size = min(4 + 0.45 * n, 16)
    with figure(path, (size, size * 0.85)) as (fig, ax):
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_xticks(range(n), labels, rotation=60 if n > 4 else 0,
                      ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 25:  # counts stay readable up to about 25 classes
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    return Path(path)


def _write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON line per row (the --predictions file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    except OSError as e:
        raise UserError(f"cannot write predictions to {path}: {e.strerror}") from e


# ---------------------------------------------------------------- dictionary_reverse


def evaluate_reverse_dictionary(
    model: GPT2, tokenizer, records: Sequence[dict], *, batch_size: int = 8,
    max_new_tokens: int = 8, templates=None, predictions: str | Path | None = None,
) -> dict:
    """Exact-match accuracy of the greedily generated word for each definition.

    The prompt is the task's template (default "{definition} =>"); the generation stops
    at a newline or <|endoftext|>, and the stripped completion must equal the word. A
    record whose prompt leaves fewer than max_new_tokens positions of the model's context
    is skipped and counted (`skipped`).
    """
    from .generate import generate
    from .tasks import render

    prompts, words = [], []
    for i, r in enumerate(records):
        try:
            prompt, target = render("dictionary_reverse", r, templates=templates)
        except UserError as e:
            raise UserError(f"row {i} (counting from 0): {e}") from None
        prompts.append(prompt)
        words.append(target.strip())
    room = model.cfg.n_positions - max_new_tokens
    fits = [len(ids) <= room for ids in encode(tokenizer, prompts, model.cfg.vocab_size)]
    skipped = fits.count(False)
    if skipped:
        print(f"gpt2jax: warning: skipped {skipped} of {len(prompts)} records whose prompt "
              f"is longer than {room} tokens (the model's context of {model.cfg.n_positions} "
              f"less {max_new_tokens} to generate)", file=sys.stderr)
        prompts = [p for p, ok in zip(prompts, fits, strict=True) if ok]
        words = [w for w, ok in zip(words, fits, strict=True) if ok]
    if not prompts:
        raise UserError("no record has a prompt short enough for the model's context")
    samples = generate(model, tokenizer, prompts, greedy=True, max_new_tokens=max_new_tokens,
                       stop=["\n"], batch_size=batch_size)
    guesses = [s.completion.strip() for s in samples]
    hits = [g == w for g, w in zip(guesses, words, strict=True)]
    if predictions is not None:
        _write_jsonl(predictions, ({"prompt": p, "word": w, "generated": g}
                                   for p, w, g in zip(prompts, words, guesses, strict=True)))
    return {"exact_match": float(np.mean(hits)), "examples": len(hits),
            "correct": int(sum(hits)), "skipped": skipped,
            "samples": [{"word": w, "generated": g} for w, g in list(zip(words, guesses))[:5]]}


def run_templates(run_dir: str | Path, task: str):
    """The templates a gpt2jax run trained `task` with (its config.yaml), or None when the
    run trained another task, so evaluation prompts the way training rendered."""
    from .config import read_run_config
    from .tasks import Templates

    cfg = read_run_config(run_dir)
    return Templates.from_data(cfg.data) if cfg.data.task == task else None


# ---------------------------------------------------------------- classification


def label_indices(values: Sequence, labels: Sequence[str], column: str = "label") -> np.ndarray:
    """Class indices of a label column: label names, or integers 0..len(labels)-1.

    A name wins over an index; a string of digits that is not a name is an index (a csv
    column that mixes names and indices is read as strings).
    """
    index = {name: i for i, name in enumerate(labels)}
    out = np.empty(len(values), np.int64)
    for row, v in enumerate(values):
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # csv readers turn an integer column with gaps into floats
        if isinstance(v, str) and v not in index and v.strip().isdigit():
            v = int(v)
        if isinstance(v, str) and v in index:
            out[row] = index[v]
        elif isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v < len(labels):
            out[row] = int(v)
        else:
            raise UserError(
                f"row {row} (counting from 0): {column} {v!r} is not one of the model's labels "
                f"({', '.join(labels)}, or their indices 0..{len(labels) - 1})")
    return out


def evaluate_classification(model: GPT2, tokenizer, texts: Sequence[str], labels: Sequence, *,
                            batch_size: int = 8, seq_len: int | None = None,
                            predictions: str | Path | None = None,
                            label_column: str = "label") -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1 and the confusion matrix.

    Texts are tokenized as they are: no <|endoftext|> is appended (transformers'
    GPT2ForSequenceClassification would skip a trailing token equal to its pad token,
    so such inputs would disagree after export). Texts longer than seq_len (default
    n_positions) keep their first seq_len tokens. With `predictions`, writes one JSON
    line per example: text, label, predicted, probabilities.
    """
    seq_len, _ = _checked(model, "classification", batch_size, seq_len)
    texts = list(texts)
    cfg = model.cfg
    names = tuple(cfg.labels) or tuple(str(i) for i in range(cfg.num_labels))
    y_true = label_indices(labels, names, label_column)
    ids = [row[:seq_len] for row in encode(tokenizer, texts, cfg.vocab_size)]
    for row, r in enumerate(ids):
        if not r:
            raise UserError(f"row {row} (counting from 0) has an empty text; remove or fill it")
    pad = eos_id(tokenizer, cfg.eos_token_id) if cfg.pad_token_id is None else cfg.pad_token_id
    probs = batched(class_probabilities, model, ids, pad, batch_size).astype(np.float64)
    y_pred = probs.argmax(-1)
    result = {**classification_metrics(y_true, y_pred, names), "examples": len(ids)}
    if predictions is not None:
        _write_jsonl(predictions, (
            {"text": text, "label": names[t], "predicted": names[p],
             "probabilities": {name: float(x) for name, x in zip(names, pr, strict=True)}}
            for text, t, p, pr in zip(texts, y_true, y_pred, probs, strict=True)))
        result["predictions"] = str(predictions)
    return result


# ---------------------------------------------------------------- records -> metrics


def evaluate_data(model: GPT2, tokenizer, data: str, *, task: str | None = None,
                  text_column: str = "text", label_column: str = "label",
                  split: str | None = None, text_unit: str = "document", batch_size: int = 8,
                  seq_len: int | None = None, stride: int | None = None,
                  predictions: str | Path | None = None, templates=None,
                  limit: int = 0) -> dict:
    """Evaluate on a data spec (see data.load_records); what `gpt2jax eval` runs.

    task defaults to "classification" for a model with a classification head, else "lm".
    templates (tasks.Templates): the dictionary_reverse prompt/target; default the task's.
    limit > 0: the first `limit` records only.
    """
    from .data import load_records, require_column

    task = task or ("lm" if model.cfg.head == "lm" else "classification")
    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if limit < 0:
        raise UserError(f"--limit must be >= 0 (0: every record), got {limit}")
    if task == "lm" and predictions is not None:
        raise UserError("--predictions applies to --task classification")
    _checked(model, task, batch_size, seq_len, stride)  # before the (possibly slow) loading
    ds = load_records(data, text_unit=text_unit, split=split, limit=limit)
    if task == "dictionary_reverse":
        return {"task": task, **evaluate_reverse_dictionary(
            model, tokenizer, ds.to_list(), batch_size=batch_size, predictions=predictions,
            templates=templates)}
    require_column(ds, text_column, data)
    texts = list(ds[text_column])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(
            f"{data}: row {bad} (counting from 0) of column {text_column!r} is "
            f"{texts[bad]!r}, not text; pick the text column with --text-column")
    if task == "lm":
        result = evaluate_lm(model, tokenizer, texts, batch_size=batch_size, seq_len=seq_len,
                             stride=stride)
    else:
        require_column(ds, label_column, data)
        result = evaluate_classification(
            model, tokenizer, texts, list(ds[label_column]), batch_size=batch_size,
            seq_len=seq_len, predictions=predictions, label_column=label_column)
    return {"task": task, **result}
