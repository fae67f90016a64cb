"""The stacks `gpt2jax bench --vs` runs beside gpt2jax (transformers' PyTorch, KerasHub;
docs/benchmarks.md, "Method"), each in a process of its own.

A worker answers JSON requests on its stdin, one per line: {"op": "init", ...} ->
versions; {"op": "train", "n": n} -> [seconds, CPU seconds, minor page faults]; {"op":
"eval", "kind": "decode" | "lm" | "classification"} -> [seconds, tokens or examples]; EOF
ends it. Arrays travel in an .npz file loaded without pickle. A worker inherits gpt2jax's
environment, GLIBC_TUNABLES included, so both sides run under one allocator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from .errors import UserError

PEERS = {"hf": "transformers", "keras": "KerasHub"}
_MODULES = {"hf": ("torch", "transformers"), "keras": ("keras", "keras_hub")}
_INSTALL = {"hf": "pip install 'gpt2jax[bench]' (torch==2.13.0, the CPU wheel)",
            "keras": "pip install --no-deps keras==3.15.1 keras-hub==0.32.0 and "
                     "pip install namex optree h5py (the Makefile's test setup does this)"}


def parse(text: str | None) -> tuple[str, ...]:
    """`--vs hf,keras` -> ("hf", "keras"); UserError for an unknown name."""
    names = tuple(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    for n in names:
        if n not in PEERS:
            raise UserError(f"--vs {text}: unknown peer {n!r}; choose from {', '.join(PEERS)}")
    return names


def require(peer: str) -> None:
    """UserError unless the peer's packages are installed (checked without importing them
    here: they run in the worker process)."""
    for name in _MODULES[peer]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = False
        if not found:
            raise UserError(f"--vs {peer} needs {', '.join(_MODULES[peer])} (no module named "
                            f"{name!r}); install them: {_INSTALL[peer]}")


def measured(run: Callable[[int], float], n: int) -> list:
    """[seconds, CPU seconds, minor page faults] of run(n): its own seconds, and this
    process's user + system time (every thread) and faults while it ran."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    secs = run(n)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return [secs, r.ru_utime + r.ru_stime - r0.ru_utime - r0.ru_stime,
            r.ru_minflt - r0.ru_minflt]


# ---------------------------------------------------------------- the steps


def _timed(step: Callable[[], float], name: str) -> Callable[[int], float]:
    """run(n) -> seconds of n steps; `step` returns its loss on the host, so each step is
    finished when it returns (a CUDA device included)."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        if loss != loss:
            raise RuntimeError(f"the {name} step produced a NaN loss")
        return time.perf_counter() - t0

    return run


def rep_timer(forward: Callable, reps: int, units: int,
              finish: Callable) -> Callable[[], tuple[float, int]]:
    """run() -> (seconds, units * reps) of `reps` calls of forward(), the last output
    waited for with finish(out)."""

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = forward()
        finish(out)
        return time.perf_counter() - t0, units * reps

    return run


def hf_dims(cfg) -> dict:
    """The transformers GPT2Config arguments of the same shape, dropout off."""
    return dict(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                activation_function=cfg.activation_function,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _hf_trainer(dims: dict, tokens, dtype: str, seed: int, where: str):
    """transformers GPT2LMHeadModel + torch.optim.AdamW in a plain loop, clipping at 1.0 like
    the Trainer; bfloat16 runs under torch.autocast with float32 weights, like our
    model.dtype. Returns run(n) -> seconds."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(HFConfig(**dims)).to(where).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    t = torch.from_numpy(tokens.astype("int64")).to(where)
    inputs, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def step() -> float:
        with torch.autocast(where, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                 targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _timed(step, PEERS["hf"])


def _hf_forwards(dims: dict, tokens, weights: dict, decode: dict | None,
                 evaluate: dict | None, where: str) -> dict:
    """transformers' counterparts of our forwards, kind -> run() -> (seconds, tokens or
    examples): with `decode`, greedy `generate` on our weights (HF names, numpy); with
    `evaluate`, "lm" (per-token log-probabilities: the perplexity computation) and
    "classification" (GPT2ForSequenceClassification's softmax), `reps` batches each."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    forwards = {}
    if decode:
        model = GPT2LMHeadModel(HFConfig(**dims)).eval()
        state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
        # lm_head.weight is tied to wte, so it is the only key the export leaves out.
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"weight transfer to transformers: missing {missing}, "
                               f"unexpected {unexpected}")
        model.to(where)
        x = torch.tensor([decode["ids"]], device=where)

        @torch.inference_mode()
        def generate():  # min_new_tokens: exactly new_tokens every time
            return model.generate(x, attention_mask=torch.ones_like(x),
                                  pad_token_id=decode["eos"], do_sample=False,
                                  min_new_tokens=decode["new_tokens"],
                                  max_new_tokens=decode["new_tokens"])

        # generate has synced when it returns
        forwards["decode"] = rep_timer(generate, 1, decode["new_tokens"], lambda _out: None)
    if not evaluate:
        return forwards
    conf = HFConfig(**dims, num_labels=evaluate["num_labels"], pad_token_id=50256)
    lm = GPT2LMHeadModel(conf).to(where).eval()
    cls = GPT2ForSequenceClassification(conf).to(where).eval()
    ids = torch.from_numpy(tokens[:, :-1].astype("int64")).to(where)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def lm_forward():
        logp = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), -1)
        return logp[:, :-1].gather(-1, ids[:, 1:, None])

    @torch.inference_mode()
    def cls_forward():
        return torch.softmax(cls(input_ids=ids, attention_mask=mask).logits.float(), -1)

    def finish(out) -> None:
        float(out.sum())  # synchronises a CUDA device too

    reps = evaluate["reps"]
    return {**forwards, "lm": rep_timer(lm_forward, reps, ids.numel(), finish),
            "classification": rep_timer(cls_forward, reps, ids.shape[0], finish)}


def _keras_trainer(dims: dict, tokens, dtype: str, seed: int):
    """KerasHub's GPT2CausalLM of the same shape, compiled as its docs show (AdamW with the
    other sides' hyperparameters, sparse cross-entropy on logits, XLA); bfloat16 uses Keras'
    mixed_bfloat16 policy (float32 variables). Returns run(n) -> seconds and the versions."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    if dtype == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=dims["vocab_size"], num_layers=dims["n_layer"],
        num_heads=dims["n_head"], hidden_dim=dims["n_embd"],
        intermediate_dim=dims["n_inner"] or 4 * dims["n_embd"], dropout=0.0,
        max_sequence_length=dims["n_positions"])
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-4, beta_1=0.9,
                                                   beta_2=0.999, epsilon=1e-8,
                                                   weight_decay=0.01, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    x = {"token_ids": tokens[:, :-1], "padding_mask": (tokens[:, :-1] >= 0).astype("int32")}
    y = tokens[:, 1:]

    def step() -> float:
        loss = model.train_on_batch(x, y)
        return loss[0] if isinstance(loss, list) else loss

    return _timed(step, PEERS["keras"]), {"keras_version": keras.__version__,
                                          "keras_hub_version": keras_hub.__version__,
                                          "keras_backend": keras.backend.backend()}


# ---------------------------------------------------------------- the worker process


def _build(peer: str, msg: dict, tokens, weights: dict):
    """The peer's train(n), its forwards (kind -> run(): "decode" with decode arguments,
    "lm" and "classification" with evaluate ones) and its versions."""
    if peer == "keras":
        train, info = _keras_trainer(msg["dims"], tokens, msg["dtype"], msg["seed"])
        return train, {}, info
    import torch
    import transformers

    torch.set_num_threads(msg["threads"])
    where = "cuda" if msg["jax_platform"] == "gpu" and torch.cuda.is_available() else "cpu"
    train = _hf_trainer(msg["dims"], tokens, msg["dtype"], msg["seed"], where)
    forwards = _hf_forwards(msg["dims"], tokens, weights, msg["decode"], msg["evaluate"], where)
    return train, forwards, {"torch_version": torch.__version__, "torch_device": where,
                             "transformers_version": transformers.__version__}


def worker_main(peer: str) -> None:
    """The peer's side of the bench: answer requests until EOF (see the module docstring).
    Anything the libraries print goes to stderr; failures answer {"error": ...}."""
    import numpy as np

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints must not corrupt the answers
    train, forwards = None, {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "init":
                with np.load(msg["arrays"], allow_pickle=False) as z:
                    tokens = z["tokens"]
                    weights = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
                train, forwards, info = _build(peer, msg, tokens, weights)
                reply = {**info, "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
            elif msg["op"] == "train":
                reply = measured(train, msg["n"])
            else:
                reply = list(forwards[msg["kind"]]())
            answer = {"ok": reply}
        except Exception as e:  # the parent turns it into a UserError
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def worker_env(environ=os.environ) -> dict[str, str]:
    """A worker's environment: ours (the same allocator tunables), Keras on JAX."""
    return {**environ, "KERAS_BACKEND": "jax"}


class Worker:
    """The parent's handle on a peer's worker process (environment: `worker_env`)."""

    def __init__(self, peer: str):
        self.peer, self.name = peer, PEERS[peer]
        self.tmp = tempfile.TemporaryDirectory(prefix="gpt2jax-bench-")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from gpt2jax.peers import worker_main; worker_main({peer!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env())

    def init(self, tokens, weights: dict | None, **kw) -> dict:
        """Build the peer's model (and decoder, with weights) in the worker."""
        import numpy as np

        path = os.path.join(self.tmp.name, "arrays.npz")
        np.savez(path, tokens=tokens, **{f"w/{k}": v for k, v in (weights or {}).items()})
        return self.call("init", arrays=path, **kw)

    def call(self, op: str, **kw):
        """Send one request and return its answer."""
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:  # it died (out of memory, a crash): its own stderr says why
            raise UserError(f"--vs {self.peer}: the {self.name} worker process exited with "
                            f"status {self.proc.wait()} (its output above says why)")
        answer = json.loads(line)
        if "error" in answer:
            raise UserError(f"--vs {self.peer}: the {self.name} side failed: {answer['error']}")
        return answer["ok"]

    def close(self) -> None:
        """End the worker: EOF on its stdin, then a kill if it does not exit."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()
