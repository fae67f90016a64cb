"""Training parity with an independent reference: transformers + torch.optim.AdamW.

`gpt2jax train` (the command, in process) fine-tunes a transformers directory for a few
full-batch steps; the same model trains in PyTorch (GPT2LMHeadModel /
GPT2ForSequenceClassification, torch.optim.AdamW with the same parameter groups,
torch's clip_grad_norm_, a LambdaLR with gpt2jax's documented schedule) on the same
rows. Every step's loss, gradient norm and learning rate, and every tensor's total update
(exported weights minus initial weights), must agree to float32 noise.

The reference runs in float64, so it is the exact answer and the bounds measure
gpt2jax's float32 error alone. Why these bounds: float32 rounding (1.2e-7 relative) in
the logits and gradients is amplified by Adam, which divides each gradient entry by its
running RMS, so entries whose gradient is nearly zero move by rounding noise (the key
bias, whose gradient is exactly zero, is bounded separately: see update_error). For
scale, torch's own float32 run of the LM case lies this far from its float64 run: loss
3.4e-7, gradient norm 2.0e-4, updates 8e-5. gpt2jax's float32 runs measured (largest
over steps and tensors; LM full batch / accumulation + scan_layers / classifier): loss
3.5e-7 / 1.8e-7 / 3.5e-6, gradient norm 1.7e-6 / 1.7e-6 / 6.3e-6, updates 1.8e-5 / 1.5e-5
/ 2.5e-5 of each tensor's update norm. The bounds (LOSS_RTOL, NORM_RTOL, UPDATE_TOL) sit
3-15 times above that and far below what a real mistake causes: weight decay on the wrong
tensors moves updates by ~wd * |w| / |update| ~ 2e-3, a learning rate one schedule step
off by >= 10%, a missing clip by the clipping ratio (4x here); each of these three,
tried on the LM case, already failed the loss check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import save_hf_model

from gpt2jax.tracking import read_metrics

LOSS_RTOL = 1e-5  # per-step loss, relative
NORM_RTOL = 1e-4  # per-step gradient norm (before clipping), relative
UPDATE_TOL = 3e-4  # ||update_ours - update_ref|| / ||update_ref||, per tensor
WORDS = ("river stone light window garden morning quiet paper harbor engine winter "
         "lantern meadow silver thunder orchard velvet canyon ember").split()


def lr_factor(step: int, total: int, warmup: int, end_ratio: float = 0.0) -> float:
    """gpt2jax's schedule as a multiplier of optim.lr (gpt2jax/optim.py, make_schedule):
    warmup is min(warmup_steps, total - 1) steps rising linearly from lr / (warmup + 1) to
    lr (so the first step is not a no-op), then cosine from lr to end_lr at `total`."""
    warmup = min(warmup, total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def decay_groups(model, decay_embeddings: bool, weight_decay: float) -> list[dict]:
    """torch parameter groups of the usual recipe: decay matrices (Conv1D weights, the
    score layer), never biases or LayerNorm; wte/wpe only when asked."""
    decay, rest = [], []
    for name, p in model.named_parameters():  # tied lm_head.weight is listed once, as wte
        embedding = name.endswith(("wte.weight", "wpe.weight"))
        wants = p.ndim == 2 and (decay_embeddings or not embedding)
        (decay if wants else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def torch_train(model, loss_of_rows, rows, optim: dict, steps: int, micro: int) -> dict:
    """Full-batch AdamW steps in float64 on `rows` (every step sees all of them),
    accumulating the gradients of len(rows) / micro micro-batches when micro < len(rows).
    Returns the per-step losses, pre-clip gradient norms and learning rates, and the
    update of every parameter (final - initial) by name."""
    import torch

    model = model.double()
    model.eval()  # no dropout (gpt2jax runs with model.dropout=0); gradients still flow
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(decay_groups(model, optim["decay_embeddings"], optim["weight_decay"]),
                            lr=optim["lr"], betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, optim["warmup_steps"]))
    n = len(next(iter(rows.values())))
    losses, norms, lrs = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for start in range(0, n, micro):  # equal-sized micro-batches: mean of means
            part = {k: v[start:start + micro] for k, v in rows.items()}
            loss = loss_of_rows(model, part) * (micro / n)
            loss.backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim["clip_norm"])))
        lrs.append(opt.param_groups[0]["lr"])
        losses.append(total)
        opt.step()
        sched.step()
    after = model.state_dict()
    updates = {k: (after[k] - before[k]).numpy() for k in before if k != "lm_head.weight"}
    return {"loss": losses, "grad_norm": norms, "lr": lrs, "updates": updates}


def lm_loss(model, part):
    import torch

    blocks = torch.tensor(part["blocks"], dtype=torch.long)
    logits = model(blocks[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             blocks[:, 1:].reshape(-1))


def cls_loss(model, part):
    import torch

    out = model(torch.tensor(part["ids"], dtype=torch.long),
                attention_mask=torch.tensor(part["mask"]))
    return torch.nn.functional.cross_entropy(out.logits, torch.tensor(part["labels"]))


def exact_blocks(tokenizer, n_blocks: int, seq_len: int, seed: int = 0) -> tuple[str, np.ndarray]:
    """A text that packs into exactly n_blocks blocks, and those blocks.

    Packing as documented in gpt2jax/batches.py: EOS, then the document's tokens; blocks
    of seq_len + 1 tokens overlapping by one; the ragged tail is dropped. With exactly
    batch_size blocks every step sees all of them.
    """
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while True:
        words.append(str(rng.choice(WORDS)))
        ids = tokenizer(" ".join(words))["input_ids"]
        if len(ids) // seq_len >= n_blocks:
            break
    stream = np.asarray([tokenizer.eos_token_id, *ids])
    assert len(stream) - 1 < (n_blocks + 1) * seq_len  # the next word adds < seq_len tokens
    starts = np.arange(n_blocks) * seq_len
    return " ".join(words), np.stack([stream[s:s + seq_len + 1] for s in starts])


def run_gpt2jax(cli, tmp: Path, init: Path, data: dict, optim: dict, train: dict,
                mesh: dict, model: dict | None = None) -> tuple[list[dict], Path]:
    """`gpt2jax train` then `gpt2jax export`: (per-step metric rows, export directory)."""
    run = tmp / "run"
    cfg = {"model": {"init": str(init), "dropout": 0.0, **(model or {})}, "data": data,
           "optim": {**optim, "schedule": "cosine"}, "mesh": mesh,
           "train": {"run_dir": str(run), "log_every": 1, "eval_every": 0,
                     "checkpoint_every": 0, "progress": "none", **train}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = cli("train", tmp / "cfg.yaml", "--json")
    assert res.code == 0, res.err
    res = cli("export", "--model", run, "--out", tmp / "export")
    assert res.code == 0, res.err
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in rows] == list(range(1, train["steps"] + 1))
    return rows, tmp / "export"


def exported_updates(export: Path, cls, initial: dict) -> dict[str, np.ndarray]:
    """Exported weights (loaded by transformers) minus the torch model's initial weights."""
    final = cls.from_pretrained(str(export)).state_dict()
    return {k: final[k].double().numpy() - v.double().numpy() for k, v in initial.items()
            if k != "lm_head.weight"}


def key_bias(name: str, n: int) -> slice | None:
    """The key third of a c_attn bias (q, k, v packed in that order), else None."""
    return slice(n // 3, 2 * n // 3) if name.endswith("attn.c_attn.bias") else None


def update_error(name: str, have: np.ndarray, want: np.ndarray, total_lr: float,
                 key_noise: float = 0.01) -> float:
    """||have - want|| / ||want|| for one tensor's update. Softmax ignores a shift shared
    by all keys, so the key bias has no gradient: exactly none in float64, rounding noise
    that Adam turns into small steps otherwise (float32: under 1% of the summed learning
    rates; bfloat16 noise is larger than eps, so about sign-sized steps: key_noise=1).
    That part is bounded; the query and value parts are compared."""
    kb = key_bias(name, len(want))
    if kb is not None:
        assert np.abs(want[kb]).max() < 1e-9
        assert np.abs(have[kb]).max() < key_noise * total_lr
        keep = np.ones(len(want), bool)
        keep[kb] = False
        want, have = want[keep], have[keep]
    scale = np.linalg.norm(want)
    assert scale > 0, f"{name} did not move in torch: the test would prove nothing"
    return float(np.linalg.norm(have - want) / scale)


def assert_same_training(rows: list[dict], ref: dict, ours: dict[str, np.ndarray],
                         total_lr: float) -> dict:
    """Per-step loss, grad norm and lr, and every tensor's update; returns the worst
    relative differences (printed, for the record)."""
    got = {k: np.array([r[k] for r in rows]) for k in ("loss", "grad_norm", "lr")}
    worst = {}
    for key, tol in (("loss", LOSS_RTOL), ("grad_norm", NORM_RTOL)):
        rel = np.abs(got[key] - ref[key]) / np.abs(ref[key])
        worst[key] = float(rel.max())
        assert worst[key] < tol, (key, got[key], ref[key])
    np.testing.assert_allclose(got["lr"], ref["lr"], rtol=1e-6)  # logged in float32
    assert ours.keys() == ref["updates"].keys()
    errors = {name: update_error(name, ours[name], want, total_lr)
              for name, want in ref["updates"].items()}
    worst["update"] = max(errors.values())
    assert worst["update"] < UPDATE_TOL, errors
    print("largest relative differences:", json.dumps(worst))
    return worst


# ---------------------------------------------------------------- language model

LM_OPTIM = {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.1, "clip_norm": 0.5,
            "decay_embeddings": True}


@pytest.fixture(scope="module")
def lm_source(tmp_path_factory):
    """A tiny random GPT2LMHeadModel directory, its initial state dict and 8 blocks of 33."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("parity_lm")
    model = save_hf_model(tmp / "hf", seed=3)
    text, blocks = exact_blocks(AutoTokenizer.from_pretrained(str(tmp / "hf")), 8, 32)
    (tmp / "train.txt").write_text(text)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tmp, model, initial, blocks


@pytest.mark.parametrize("accum, steps, mesh, model", [
    (1, 6, {"data": 2, "fsdp": 4}, {}),  # warmup 2 + cosine 4, weights sharded over fsdp
    # 4 micro-batches of 2 rows; layers scanned (stacked weights), tensor parallelism
    (4, 3, {"data": 2, "fsdp": 1, "tensor": 4}, {"scan_layers": True}),
], ids=["full_batch_fsdp", "grad_accum_4_scan_layers_tensor"])
def test_lm_finetuning_equals_transformers_and_torch_adamw(lm_source, cli, tmp_path, accum,
                                                           steps, mesh, model):
    from transformers import GPT2LMHeadModel

    tmp, _, initial, blocks = lm_source
    data = {"train": str(tmp / "train.txt"), "task": "lm", "validation_fraction": 0.0}
    train = {"steps": steps, "batch_size": 8, "grad_accum": accum, "seq_len": 32}
    rows, export = run_gpt2jax(cli, tmp_path, tmp / "hf", data, LM_OPTIM, train, mesh, model)

    torch_model = GPT2LMHeadModel.from_pretrained(str(tmp / "hf"))
    ref = torch_train(torch_model, lm_loss, {"blocks": blocks}, LM_OPTIM, steps, micro=8 // accum)
    assert_same_training(rows, ref, exported_updates(export, GPT2LMHeadModel, initial),
                         sum(ref["lr"]))
    assert ref["loss"][-1] < ref["loss"][0]  # it learned: not a run of no-op steps


# bfloat16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding). A loss near log(vocab)
# from near-uniform logits hardly feels it; the gradients do, and Adam passes their
# relative error on to the updates.
BF16_LOSS_RTOL = 1e-3
BF16_UPDATE_TOL = 0.1
BF16_PPL_RTOL = 1e-3


def test_bfloat16_training_step_export_and_eval_against_transformers(lm_source, cli, tmp_path):
    """model.dtype=bfloat16 (bf16 compute, float32 master weights): the per-step losses and
    the updates stay within bfloat16's precision of the exact (float64) torch training
    (measured: loss 4.6e-6 relative, updates 2.2e-2 of each tensor's norm, against 2e-5
    for float32 compute); the export loads in transformers, and `gpt2jax eval` of the run
    (computing in bf16, as it trained) equals transformers' float32 perplexity of the
    export within 1e-3 (measured 1.1e-5)."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tmp, _, initial, blocks = lm_source
    data = {"train": str(tmp / "train.txt"), "task": "lm", "validation_fraction": 0.0}
    train = {"steps": 3, "batch_size": 8, "seq_len": 32}
    rows, export = run_gpt2jax(cli, tmp_path, tmp / "hf", data, LM_OPTIM, train,
                               {"data": 2, "fsdp": 4}, {"dtype": "bfloat16"})
    ref = torch_train(GPT2LMHeadModel.from_pretrained(str(tmp / "hf")), lm_loss,
                      {"blocks": blocks}, LM_OPTIM, 3, micro=8)
    loss = np.array([r["loss"] for r in rows])
    loss_rel = np.abs(loss - ref["loss"]).max() / np.abs(ref["loss"]).max()
    assert loss_rel < BF16_LOSS_RTOL, loss_rel
    ours = exported_updates(export, GPT2LMHeadModel, initial)
    errors = [update_error(name, ours[name], want, sum(ref["lr"]), key_noise=1.0)
              for name, want in ref["updates"].items()]
    assert 1e-3 < max(errors) < BF16_UPDATE_TOL, errors  # bf16 for real (f32: 2e-5), close

    text = "The river stone lay quiet in the morning light beside the old harbor engine."
    (tmp_path / "eval.txt").write_text(text)
    tok = AutoTokenizer.from_pretrained(str(export))
    ids = torch.tensor([[tok.eos_token_id, *tok(text)["input_ids"]]])  # one window
    with torch.no_grad():
        hf = GPT2LMHeadModel.from_pretrained(str(export)).eval()
        hf_ppl = float(torch.exp(hf(ids, labels=ids).loss))
    res = cli("eval", "--model", tmp_path / "run", "--data", tmp_path / "eval.txt", "--json")
    assert res.code == 0, res.err
    assert res.json["tokens"] == ids.shape[1] - 1
    assert res.json["perplexity"] == pytest.approx(hf_ppl, rel=BF16_PPL_RTOL)


# ---------------------------------------------------------------- sequence classification

TEXTS = {"pos": ["sunny bright warm day", "a cheerful morning", "warm"],
         "neg": ["rainy cold and dark all day long today", "gloomy", "the day was grey"],
         "neu": ["mild", "cloudy plain weather this week", "a very ordinary day"]}


def test_sequence_classifier_finetuning_equals_transformers(tmp_path, cli):
    """GPT2ForSequenceClassification with pad == eos, right-padded batches of unequal
    lengths (pooling the last real token), against gpt2jax's sequence head."""
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    labels = ["neg", "neu", "pos"]  # gpt2jax's sorted label order = the source's ids
    src = tmp_path / "hf"
    save_hf_model(src, seed=4, head="sequence", num_labels=3, pad_token_id=50256,
                  id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})
    records = [(t, y) for y in labels for t in TEXTS[y]][:8]
    (tmp_path / "train.csv").write_text(
        "text,label\n" + "".join(f"{t},{y}\n" for t, y in records))
    optim = {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.1, "clip_norm": 1.0,
             "decay_embeddings": False}
    data = {"train": str(tmp_path / "train.csv"), "task": "classification",
            "validation_fraction": 0.0}
    rows, export = run_gpt2jax(
        cli, tmp_path, src, data, optim, {"steps": 4, "batch_size": 8, "seq_len": 32},
        {"data": 4, "fsdp": 2}, {"head": "sequence", "classifier_dropout": 0.0})

    tok = AutoTokenizer.from_pretrained(str(src))
    ids = [tok(t)["input_ids"] for t, _ in records]
    width = max(map(len, ids)) + 3  # padding the reference must ignore
    batch = {"ids": np.full((8, width), tok.eos_token_id), "mask": np.zeros((8, width), np.int64),
             "labels": np.array([labels.index(y) for _, y in records])}
    for i, r in enumerate(ids):
        batch["ids"][i, :len(r)], batch["mask"][i, :len(r)] = r, 1
    assert len(set(map(len, ids))) > 2  # really padded, at several lengths
    model = GPT2ForSequenceClassification.from_pretrained(str(src))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = torch_train(model, cls_loss, batch, optim, 4, micro=8)
    ours = exported_updates(export, GPT2ForSequenceClassification, initial)
    assert_same_training(rows, ref, ours, sum(ref["lr"]))
    assert "score.weight" in ref["updates"]
    assert ref["loss"][-1] < ref["loss"][0]


# ---------------------------------------------------------------- remat and scan_layers


def test_gradients_under_every_remat_policy_and_scan_layers_equal_torch(tmp_path):
    """model.remat (dots, full) and model.scan_layers change how the backward pass is
    computed, never its value: each variant's gradient equals torch's (float64) to float32
    noise (1e-5 of each tensor's norm; measured 5e-7, as without remat, which the training
    tests above cover), and the variants agree with each other to 1e-6."""
    import optax
    import torch
    from flax import nnx
    from transformers import GPT2LMHeadModel

    from gpt2jax.hf import load_hf_dir, to_hf_tensors

    path = tmp_path / "hf"
    save_hf_model(path, seed=9, tokenizer=False, vocab_size=96, n_layer=3)
    ids = np.random.RandomState(8).randint(0, 96, (2, 24))
    ref = GPT2LMHeadModel.from_pretrained(str(path)).double().eval()
    ref(torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
    want = {k: p.grad.numpy() for k, p in ref.named_parameters()}

    def loss(model, x):
        logits = model(x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    grads = {}
    for remat, scan in (("dots", False), ("full", True)):
        model = load_hf_dir(path, remat=remat, scan_layers=scan)
        assert (model.cfg.remat, model.cfg.scan_layers) == (remat, scan)
        graphdef, _ = nnx.split(model)
        g = nnx.jit(nnx.grad(loss))(model, ids)
        grads[remat, scan] = to_hf_tensors(nnx.merge(graphdef, g))  # HF names and layouts
    assert grads["dots", False].keys() == want.keys()
    worst = {"torch": 0.0, "variants": 0.0}
    for variant, g in grads.items():
        for name, w in want.items():
            scale = np.linalg.norm(w)
            assert scale > 0, name
            rel = np.linalg.norm(g[name] - w) / scale
            assert rel < 1e-5, (variant, name, rel)
            among = np.linalg.norm(g[name] - grads["dots", False][name]) / scale
            assert among < 1e-6, (variant, name, among)
            worst = {"torch": max(worst["torch"], rel), "variants": max(worst["variants"], among)}
    print("largest relative gradient differences:", worst)
