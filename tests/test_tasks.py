"""Task templates, loss masks, conversation rendering, classification objectives, special
tokens, reverse-dictionary evaluation and resumable batches, on tiny data made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpt2jax.batches import Batcher, prepare
from gpt2jax.config import DataSection
from gpt2jax.errors import UserError
from gpt2jax.tasks import (
    Templates,
    balanced_class_weights,
    grow_embedding,
    iter_gcide,
    render,
)
from gpt2jax.tokenizer import gpt2_tokenizer
from gpt2jax.tracking import read_metrics

EOS = 50256
ENTRIES = [("cat", "a small domesticated feline", "the cat sat"),
           ("oak", "a large tree of the genus Quercus", ""),
           ("lamp", "a device that gives light", "turn off the lamp"),
           ("river", "a large natural stream of water", "")]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _dictionary(path: Path, repeat: int = 1) -> Path:
    return _jsonl(path, [{"word": w, "definition": d, "example": e}
                         for w, d, e in ENTRIES * repeat])


# ---------------------------------------------------------------- templates


def test_default_and_configured_templates():
    rec = {"word": "cat", "definition": "a feline", "example": "the cat sat"}
    assert render("dictionary_forward", rec) == ("cat:", " a feline Example: the cat sat")
    assert render("dictionary_forward", {**rec, "example": ""}) == ("cat:", " a feline")
    assert render("dictionary_reverse", rec) == ("a feline =>", " cat")
    custom = Templates("Define {word}.", " {definition}", example="")
    assert render("dictionary_forward", rec, templates=custom) == ("Define cat.", " a feline")
    qa = Templates("Q: {q}\nA:", " {a}")
    assert render("lm", {"q": "2+2?", "a": "4"}, templates=qa) == ("Q: 2+2?\nA:", " 4")
    assert render("text", {"text": "床前明月光"}) == ("", "床前明月光")
    with pytest.raises(UserError, match="names column 'word'.*columns: definition"):
        render("dictionary_forward", {"definition": "x"})
    with pytest.raises(UserError, match="not a valid format string"):
        render("lm", {"q": 1}, templates=Templates("{q", ""))


def test_conversation_renders_one_speaker_line_per_message(tmp_path, tok):
    chats = [{"messages": [{"speaker": "ana", "text": "omw", "timestamp": "2024-05-01T10:00"},
                           {"speaker": "ben", "text": "k see u"}]},
             {"messages": [{"speaker": "ben", "text": "u up?"},
                           {"speaker": "ana", "text": "ya"}]}] * 4
    src = _jsonl(tmp_path / "chats.jsonl", chats)
    d = DataSection(train=str(src), task="conversation", validation_fraction=0.0,
                    cache_dir="off")
    p = prepare(d, tok, seq_len=8, seed=0, eos=EOS)
    stream = tok.decode(np.concatenate([p.train.arrays()["tokens"][0], *[b[1:] for b in
                                                               p.train.arrays()["tokens"][1:]]]))
    assert stream.startswith("<|endoftext|>ana: omw\nben: k see u<|endoftext|>ben: u up?\nana: ya")
    assert "2024" not in stream  # timestamps are metadata, not text
    with pytest.raises(UserError, match=r"row 0 .*message 0 .*needs \"speaker\""):
        bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"who": "x", "text": "y"}]}])
        prepare(DataSection(train=str(bad), task="conversation", cache_dir="off"), tok,
                seq_len=8, seed=0, eos=EOS)


def test_gcide_records_render_with_the_forward_template():
    records = list(iter_gcide("Q"))
    assert len(records) > 500
    assert all(r["word"] and r["definition"] for r in records)
    with_example = next(r for r in records if r["example"])
    prompt, target = render("dictionary_forward", with_example)
    assert prompt == f"{with_example['word']}:" and target.endswith(with_example["example"])


def test_loss_on_target_weights_only_the_target_tokens(tmp_path, tok):
    src = _dictionary(tmp_path / "d.jsonl", repeat=3)
    d = DataSection(train=str(src), task="dictionary_forward", loss_on="target",
                    validation_fraction=0.0, cache_dir="off")
    p = prepare(d, tok, seq_len=8, seed=0, eos=EOS)
    # the expected stream: EOS (learned: it ends the previous record), prompt tokens (not
    # learned), target tokens (learned)
    toks, ws = [], []
    for w, definition, example in ENTRIES * 3:
        prompt = tok(f"{w}:")["input_ids"]
        full = tok(f"{w}: {definition}" + (f" Example: {example}" if example else ""))["input_ids"]
        assert full[: len(prompt)] == prompt
        toks += [EOS, *full]
        ws += [1] + [0] * len(prompt) + [1] * (len(full) - len(prompt))
    targets = np.concatenate([b[1:] for b in p.train.arrays()["tokens"]])
    weights = np.concatenate([b[1:] for b in p.train.arrays()["weights"]])
    n = len(targets)
    np.testing.assert_array_equal(targets, toks[1: n + 1])
    np.testing.assert_array_equal(weights, ws[1: n + 1])
    assert 0 < weights.mean() < 1
    learned_not = tok.decode(targets[weights == 0])
    assert learned_not.startswith("cat:oak:lamp:")
    everything = prepare(DataSection(train=str(src), task="dictionary_forward",
                                     validation_fraction=0.0, cache_dir="off"),
                         tok, seq_len=8, seed=0, eos=EOS)
    assert (everything.train.arrays()["weights"] == 1).all()
    np.testing.assert_array_equal(everything.train.arrays()["tokens"], p.train.arrays()["tokens"])


# ---------------------------------------------------------------- classification objectives


def test_balanced_class_weights_and_embedding_growth():
    w = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w, [4 / 9, 4 / 3, 0.0], rtol=1e-6)
    assert float(w[[0, 0, 0, 1]].sum()) == pytest.approx(8 / 3)  # both classes weigh alike
    wte = np.arange(12, dtype=np.float32).reshape(4, 3)
    grown = grow_embedding(wte, 6)
    assert grown.shape == (6, 3)
    np.testing.assert_array_equal(grown[:4], wte)
    np.testing.assert_allclose(grown[4:], [[4.5, 5.5, 6.5]] * 2)


def _classifier_batch():
    """A 1-layer classifier without dropout and 4 rows with 7, 4, 7 and 2 real next-token
    pairs (so per-row means differ from the pooled mean): (graphdef, params, ids, mask,
    labels)."""
    import jax
    from flax import nnx

    from gpt2jax.model import GPT2Config, abstract_model, create_model

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64,
                     head="sequence", num_labels=3, embd_pdrop=0.0, attn_pdrop=0.0,
                     resid_pdrop=0.0, classifier_dropout=0.0, pad_token_id=0)
    graphdef = nnx.split(abstract_model(cfg))[0]
    params = jax.jit(lambda: nnx.split(create_model(cfg, 0))[1])()  # jitted: fast init
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids[mask == 0] = 0
    return graphdef, params, ids, mask, np.array([0, 2, 2, 1], np.int32)


CLASS_W, LAM = np.array([0.5, 2.0, 1.0], np.float32), 0.7


def test_class_weighted_loss_and_auxiliary_lm_loss_match_a_hand_computation():
    import jax
    import optax
    from flax import nnx

    from gpt2jax.evaluate import token_logprobs
    from gpt2jax.train import make_train_step

    graphdef, params, ids, mask, labels = _classifier_batch()
    model = nnx.merge(graphdef, params)
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None]}

    logits = np.asarray(jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))(params, ids, mask))
    ce = -np.asarray(jax.nn.log_softmax(logits))[np.arange(4), labels]
    lp = np.asarray(token_logprobs(model, ids, mask))  # 0 at t=0 and on padding
    real = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    lm = -lp[:, 1:][real].mean()
    expected = (ce * CLASS_W[labels]).sum() / CLASS_W[labels].sum() + LAM * lm

    tx = optax.sgd(0.0)
    step = make_train_step(graphdef, tx, True, 1, jax.random.key(0),
                           class_weights=CLASS_W, lm_loss_weight=LAM)
    _, _, m = jax.jit(step)(params, tx.init(params), batch, 0)
    assert float(m["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(m["loss"]) - float(ce.mean())) > 1e-3  # the options changed the loss


def test_accumulation_with_auxiliary_lm_loss_equals_the_big_batch_step():
    """grad_accum 4 (one row per micro-batch) and 1 give the same loss and gradient, and
    both equal jax.grad of the objective written out by hand: weighted mean cross-entropy
    + lambda * the LM loss averaged over all 20 real tokens of the batch (not a mean of
    per-micro-batch means, which weighs row 3's 2 tokens like row 0's 7)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gpt2jax.train import make_train_step

    graphdef, params, ids, mask, labels = _classifier_batch()

    def by_hand(p):  # the full (B, T, vocab) softmax of the tied head, no chunked loss
        model = nnx.merge(graphdef, p)
        h, _ = model.hidden_states(ids, mask)
        w = CLASS_W[labels]
        ce = -jax.nn.log_softmax(model.classify(h, mask))[jnp.arange(4), labels]
        logp = jax.nn.log_softmax(h[:, :-1] @ model.wte[...].T)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        real = mask[:, 1:] * mask[:, :-1]
        return (ce * w).sum() / w.sum() + LAM * (nll * real).sum() / real.sum()

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(by_hand))(params)
    tx = optax.sgd(1.0)  # new params = params - grads: the gradient is readable
    got = {}
    for accum in (1, 4):
        batch = {"input_ids": ids.reshape(accum, -1, 8),
                 "attention_mask": mask.reshape(accum, -1, 8), "labels": labels.reshape(accum, -1)}
        step = make_train_step(graphdef, tx, True, accum, jax.random.key(0),
                               class_weights=CLASS_W, lm_loss_weight=LAM)
        new, _, m = jax.jit(step)(params, tx.init(params), batch, 0)
        got[accum] = (float(m["loss"]), jax.tree.map(lambda a, b: np.asarray(a - b), params, new))
    # measured: losses within 1.2e-7 relative, gradients within 1.2e-7 absolute (the
    # largest entry is 0.66); the per-micro-batch mean missed the loss by 3e-3 relative
    for accum, (loss, grads) in got.items():
        assert loss == pytest.approx(float(ref_loss), rel=2e-6), accum
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=f"accum {accum}")


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, hf_lm_dir, cli):
    """A classifier on the pretrained tiny LM with every option: integer labels, left
    truncation, balanced class weights, auxiliary LM loss and an added special token."""
    tmp = tmp_path_factory.mktemp("cls-options")
    rng = np.random.default_rng(0)
    words = {0: "good great fine", 1: "bad awful poor"}
    lines = ["text,label"]
    for i in range(40):
        y = int(i % 5 == 0)  # imbalanced: 1 in 5 is class 1
        lines.append(" ".join(rng.choice(words[y].split() * 8, 12 + i % 30)) + f" <|sep|>,{y}")
    (tmp / "train.csv").write_text("\n".join(lines) + "\n")
    cfg = _write_yaml(tmp / "cfg.yaml", {
        "model": {"init": str(hf_lm_dir[0]), "head": "sequence", "dropout": 0.0},
        "data": {"train": str(tmp / "train.csv"), "task": "classification",
                 "validation_fraction": 0.2, "truncation": "left",
                 "add_special_tokens": ["<|sep|>"], "cache_dir": str(tmp / "cache")},
        # an AdamW step moves an entry by at most lr: 3 steps keep wte within 4e-7 of its start
        "optim": {"lr": 1e-7, "schedule": "constant"},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 16, "run_dir": str(tmp / "run"),
                  "class_weights": "balanced", "lm_loss_weight": 0.5, "log_every": 1,
                  "eval_every": 2, "progress": "none"},
    })
    res = cli("train", cfg, "--json")
    assert res.code == 0, res.err
    return tmp, res


def test_classification_options_train_and_export(cls_run, cli):
    from transformers import AutoConfig, AutoTokenizer

    tmp, res = cls_run
    run = tmp / "run"
    assert "records are longer than train.seq_len=16" in res.err  # the truncation warning
    model = json.loads((run / "model.json").read_text())
    assert model["labels"] == ["0", "1"] and model["vocab_size"] == 50258
    val = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "validation"]
    assert [r["step"] for r in val] == [2, 3]
    for r in val:  # the metrics recomputed by hand from the confusion matrix
        cm = np.asarray(r["confusion_matrix"], float)
        assert r["examples"] == cm.sum() == 8
        assert r["accuracy"] == pytest.approx(np.trace(cm) / 8)
        tp, pred, true = np.diag(cm), cm.sum(0), cm.sum(1)
        seen = (pred + true) > 0  # labels absent from data and predictions do not count
        f1 = np.where(seen, 2 * tp / np.maximum(pred + true, 1), 0.0)
        assert r["macro_f1"] == pytest.approx(f1[seen].mean())
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = cli("export", "--model", run, "--out", tmp / "export")
    assert res.code == 0, res.err
    hf = AutoConfig.from_pretrained(str(tmp / "export"))
    assert hf.id2label == {0: "0", 1: "1"} and hf.label2id == {"0": 0, "1": 1}
    assert hf.vocab_size == 50258
    hf_tok = AutoTokenizer.from_pretrained(str(tmp / "export"))
    assert hf_tok.convert_tokens_to_ids("<|sep|>") == 50257
    assert hf_tok("a <|sep|>")["input_ids"][-1] == 50257


def test_added_token_on_a_pretrained_model_starts_at_the_mean_embedding(cls_run, hf_lm_dir):
    from gpt2jax.run import load_run

    tmp, _ = cls_run
    model, tokenizer, _ = load_run(tmp / "run")
    assert len(tokenizer) == 50258 and model.cfg.vocab_size == 50258
    old = hf_lm_dir[1].transformer.wte.weight.detach().numpy()
    wte = np.asarray(model.wte[...])
    np.testing.assert_allclose(wte[:50257], old, rtol=0, atol=4e-7)
    mean = old.astype(np.float64).mean(0)
    assert np.abs(mean).max() > 1e-5  # the mean row is distinguishable at this tolerance
    np.testing.assert_allclose(wte[50257], mean, rtol=0, atol=4e-7)


# ---------------------------------------------------------------- eval, resume


def test_eval_dictionary_reverse_reports_exact_match(tmp_path, hf_lm_dir, cli):
    """Against a random model: words set to its own greedy output for half of the
    definitions give exactly 50% exact match."""
    from gpt2jax.generate import generate
    from gpt2jax.run import load_model

    src, _ = hf_lm_dir
    model, tokenizer, _ = load_model(str(src))
    defs = [d for _, d, _ in ENTRIES]
    outs = generate(model, tokenizer, [f"{d} =>" for d in defs], greedy=True,
                    max_new_tokens=8, stop=["\n"])
    guesses = [o.completion.strip() for o in outs]
    assert all(guesses), guesses  # a random model still emits some text
    words = [g if i % 2 == 0 else "zzz-not-it" for i, g in enumerate(guesses)]
    data = _jsonl(tmp_path / "rev.jsonl",
                  [{"word": w, "definition": d} for w, d in zip(words, defs, strict=True)])
    res = cli("eval", "--model", src, "--data", data, "--task", "dictionary_reverse",
              "--predictions", tmp_path / "pred.jsonl", "--json")
    assert res.code == 0, res.err
    assert res.json["exact_match"] == 0.5 and res.json["examples"] == 4
    rows = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in rows] == guesses
    bad = _jsonl(tmp_path / "bad.jsonl", [{"term": "x", "definition": "y"}])
    res = cli("eval", "--model", src, "--data", bad, "--task", "dictionary_reverse")
    assert res.code == 2 and "names column 'word'" in res.last_err


def test_eval_dictionary_reverse_prompts_like_the_run_was_trained(tmp_path, hf_lm_dir, cli):
    """A run trained with its own reverse template is evaluated with that template; an
    explicit --prompt-template wins."""
    src, _ = hf_lm_dir
    data = _dictionary(tmp_path / "d.jsonl", repeat=4)
    cfg = _write_yaml(tmp_path / "cfg.yaml", {
        "model": {"init": str(src), "dropout": 0.0},
        "data": {"train": str(data), "task": "dictionary_reverse", "validation_fraction": 0.0,
                 "prompt_template": "Which word means {definition}?",
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 1, "batch_size": 8, "seq_len": 16, "run_dir": str(tmp_path / "run"),
                  "progress": "none"}})
    assert cli("train", cfg).code == 0
    for extra, start in (((), "Which word means"), (("--prompt-template", "{definition} ->"),
                                                     ENTRIES[0][1])):
        pred = tmp_path / f"pred{len(extra)}.jsonl"
        res = cli("eval", "--model", tmp_path / "run", "--data", data, "--task",
                  "dictionary_reverse", "--predictions", pred, *extra)
        assert res.code == 0, res.err
        prompts = [json.loads(x)["prompt"] for x in pred.read_text().splitlines()]
        assert prompts[0].startswith(start), prompts[0]
    assert prompts[0].endswith(" ->")


def test_resuming_mid_epoch_replays_nothing_and_matches_the_uninterrupted_order(tmp_path, tok):
    """Real prepared classification rows; 2 processes; resume inside the second epoch."""
    lines = ["text,label"] + [f"{'word ' * (1 + i % 9)}{i},{'ab'[i % 2]}" for i in range(21)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    p = prepare(DataSection(train=str(tmp_path / "t.csv"), task="classification",
                            validation_fraction=0.0, cache_dir="off"),
                tok, seq_len=16, seed=0, eos=EOS)

    def run(start: int, stop: int) -> list:
        parts = [Batcher(p.train, 4, seed=9, process_index=i, process_count=2, pad_id=EOS,
                         max_len=16).iterate(start, stop) for i in range(2)]
        return [(a[0], np.concatenate([a[1]["input_ids"], b[1]["input_ids"]]),
                 np.concatenate([a[1]["labels"], b[1]["labels"]])) for a, b in zip(*parts)]

    full, resumed = run(0, 12), run(7, 12)  # 5 steps per epoch: step 7 is mid-epoch 2
    assert [s for s, _, _ in resumed] == list(range(7, 12))
    for (s, ids, y), (t, ids2, y2) in zip(full[7:], resumed, strict=True):
        assert s == t
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(y, y2)
    one = Batcher(p.train, 4, seed=9, pad_id=EOS, max_len=16)
    np.testing.assert_array_equal(full[8][2], p.train.labels[one.global_indices(8)])


def test_gcide_definitions_carry_no_source_tags():
    """'[1913 Webster]' and the like (hundreds in the first letters) say where an entry came
    from, not what the word means: gone from the records; usage labels ('[Obs.]') stay."""
    import itertools

    from gpt2jax.tasks import gcide_dir, iter_gcide

    raw = (gcide_dir() / "words_A.json").read_text(encoding="utf-8")
    assert raw.count("[1913 Webster]") > 100  # the package really has them
    defs = [r["definition"] for r in itertools.islice(iter_gcide("A"), 20000)]
    tags = ("[1913 Webster]", "[Webster 1913 Suppl.]", "[PJC]", "[WordNet 1.5]", "[wn1]")
    assert not any(tag in d for d in defs for tag in tags)
    assert any("[Obs.]" in d for d in defs)
