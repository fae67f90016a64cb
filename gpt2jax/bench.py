"""`gpt2jax bench`: training-step speed, model FLOPs and MFU, optionally side by side with
transformers' PyTorch GPT-2 and with greedy decoding.

What is timed is the trainer's own step (`train.make_train_step` with the default AdamW
chain from `optim.make_optimizer`), jitted with donated params and optimizer state, on one
device, dropout off. The FLOP/s peak is a jitted square matmul timed on the same device in
the same run; with `--vs hf` the two frameworks run in alternating rounds and medians are
reported, so background load hits both sides alike. The FLOP convention is in
`flops_per_token`; docs/benchmarks.md lists the output fields.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from . import malloc
from .config import DTYPES, OptimSection
from .errors import UserError
from .model import GPT2Config
from .tokenizer import EOS_ID

# ---------------------------------------------------------------- FLOP accounting (pure)


def matmul_params(cfg: GPT2Config) -> int:
    """Parameters that take part in a matmul per token: the blocks' four weight matrices
    (c_attn, attn c_proj, c_fc, mlp c_proj) and the LM head (tied to wte, counted once).

    Biases, LayerNorms and the position table (a lookup, no matmul) are left out.
    """
    d, f = cfg.n_embd, cfg.inner
    per_layer = d * 3 * d + d * d + d * f + f * d
    return cfg.n_layer * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: GPT2Config, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward), the PaLM convention:

        6 * matmul_params(cfg) + 12 * n_layer * n_embd * seq_len

    6N: a multiply-add is 2 FLOPs, the backward pass costs twice the forward. The
    attention term counts QK^T and probs @ V (2 * 2 * seq_len * n_embd forward per layer,
    times 3) over the full square, without halving for the causal mask. Recomputation
    under remat is not counted (model FLOPs, not hardware FLOPs).
    """
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * seq_len


def decode_flops_per_token(cfg: GPT2Config, context: int) -> int:
    """Forward FLOPs of one decoded token with a KV cache of `context` slots: 2N + 4*L*d*S."""
    return 2 * matmul_params(cfg) + 4 * cfg.n_layer * cfg.n_embd * context


# ---------------------------------------------------------------- environment


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_device(device) -> str:
    """A one-line description of the device (CPU model and core count on CPU)."""
    if device.platform == "cpu":
        return f"cpu: {_cpu_name()}, {_cores()} cores"
    return f"{device.platform}: {device.device_kind}"


def _max_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def peak_memory(device) -> tuple[int, str]:
    """(bytes, source): the device's peak_bytes_in_use when it reports memory stats
    (GPU/TPU), else the process's maximum resident set size (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
    return _max_rss_bytes(), "process_max_rss"


# ---------------------------------------------------------------- peak matmul rate


def make_peak_probe(device, dtype: str, size: int) -> Callable[[int], float]:
    """A function reps -> FLOP/s of a jitted (size x size) @ (size x size) matmul in `dtype`
    (float32 accumulation), the fastest of reps: other load only ever slows a repetition
    down, so the best is the closest to the machine's rate. Compiled and warmed on
    creation."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (size, size), jnp.float32).astype(dt), device)
    b = jax.device_put(jax.random.normal(kb, (size, size), jnp.float32).astype(dt), device)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    flops = 2.0 * size**3

    def probe(reps: int) -> float:
        times = []
        for _ in range(max(reps, 1)):
            t0 = time.perf_counter()
            mm(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        return flops / min(times)

    return probe


# ---------------------------------------------------------------- the two trainers


def _random_tokens(batch: int, seq_len: int, vocab: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)


def _jax_trainer(cfg: GPT2Config, tokens, device, seed: int, lora=None,
                 info: dict | None = None):
    """The trainer's step on one device. Returns (compile_seconds, run(n) -> seconds).
    `lora`: a model.lora section (cfg then has its adapters): only they train. `info`, if
    given, receives the trainable parameter count, the optimizer state's bytes and the
    compiler's memory analysis of the step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from .model import create_model
    from .optim import frozen_names
    from .train import make_train_step

    with jax.default_device(device):
        graphdef, params = nnx.split(create_model(cfg, seed))
    params = jax.device_put(params, device)
    # The trainer's default optimizer: AdamW, weight-decay mask, clipping, cosine schedule.
    tx, _ = make_optimizer_for(params, lora=lora)
    opt_state = jax.jit(tx.init)(params)
    step_fn = make_train_step(graphdef, tx, False, 1, jax.random.key(seed),
                              frozen=frozen_names(OptimSection(), lora, params))
    jitted = jax.jit(step_fn, donate_argnums=(0, 1))
    batch = jax.device_put({"tokens": tokens[None],
                            "weights": np.ones((1, *tokens.shape), np.float32)}, device)
    step0 = jax.device_put(jnp.int32(0), device)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, batch, step0).compile()
    compile_seconds = time.perf_counter() - t0
    if info is not None:
        info.update(_step_sizes(params, opt_state, compiled, lora))
    state = {"params": params, "opt": opt_state, "step": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        p, o, metrics = state["params"], state["opt"], None
        for _ in range(n):
            s = jax.device_put(jnp.int32(state["step"]), device)
            p, o, metrics = compiled(p, o, batch, s)
            state["step"] += 1
        jax.block_until_ready((p, metrics))
        state["params"], state["opt"] = p, o
        if not bool(metrics["finite"]):
            raise RuntimeError("the benchmark's train step produced a non-finite loss")
        return time.perf_counter() - t

    return compile_seconds, run


def make_optimizer_for(params, total_steps: int = 1_000_000, lora=None):
    """The trainer's default optimizer (OptimSection defaults) for these params."""
    from .optim import make_optimizer

    return make_optimizer(OptimSection(), total_steps, params, lora)


def _step_sizes(params, opt_state, compiled, lora) -> dict:
    """Trainable parameters, optimizer-state bytes and the compiled step's memory (XLA's
    memory analysis: arguments, outputs, temporaries) of one side of `--lora`."""
    import jax

    from .optim import frozen_names
    from .params import flat

    frozen = frozen_names(OptimSection(), lora, params) or frozenset()
    sizes = {"trainable_params": sum(int(v.size) for k, v in flat(params).items()
                                     if k not in frozen),
             "optimizer_state_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(opt_state))}
    mem = compiled.memory_analysis()
    if mem is not None:
        sizes["step_memory_bytes"] = {
            k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp")}
    return sizes


def _require_torch():
    """UserError unless torch and transformers are installed (checked without importing
    them here: they run in the worker process)."""
    import importlib.util

    for name in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = False
        if not found:
            raise UserError(
                f"--vs hf needs PyTorch and transformers (no module named {name!r}); install "
                "the optional extra: pip install 'gpt2jax[bench]' (torch==2.13.0, the CPU wheel)"
            )


def hf_dims(cfg: GPT2Config) -> dict:
    """The transformers GPT2Config arguments of the same shape, dropout off."""
    return dict(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                activation_function=cfg.activation_function,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _hf_trainer(dims: dict, tokens, dtype: str, seed: int, threads: int, where: str):
    """transformers GPT2LMHeadModel + torch.optim.AdamW in a plain loop (clipping at 1.0
    like the Trainer's default). bfloat16 runs under torch.autocast with float32 weights,
    like our model.dtype. Returns run(n) -> seconds."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(HFConfig(**dims)).to(where).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    t = torch.from_numpy(tokens.astype("int64")).to(where)
    inputs, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    autocast = dtype == "bfloat16"

    def one_step() -> float:
        with torch.autocast(where, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                 targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # synchronises a CUDA device too

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = one_step()
        if loss != loss:
            raise RuntimeError("the transformers step produced a NaN loss")
        return time.perf_counter() - t0

    return run


def _hf_decoder(dims: dict, weights: dict, ids: list, new_tokens: int, eos: int, threads: int,
                where: str):
    """transformers' greedy `generate` on our weights (HF names, numpy). Returns
    run() -> (seconds, new tokens)."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel(HFConfig(**dims)).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    # lm_head.weight is tied to wte, so it is the only key the export leaves out.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight transfer to transformers: missing {missing}, "
                           f"unexpected {unexpected}")
    model.to(where)
    x = torch.tensor([ids], device=where)

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), pad_token_id=eos,
                                 do_sample=False, min_new_tokens=new_tokens,
                                 max_new_tokens=new_tokens)
        return time.perf_counter() - t0, out.shape[1] - len(ids)

    return run


# ---------------------------------------------------------------- transformers' process


def torch_worker() -> None:
    """The transformers side of `--vs hf`, in its own process. One JSON request per line on
    stdin, one JSON answer per line on the original stdout (anything the libraries print
    goes to stderr); arrays travel in an .npz file loaded without pickle.
    {"op": "init", ...} -> versions; {"op": "train", "n": n} -> [seconds, cpu seconds,
    minor page faults];
    {"op": "decode"} -> [seconds, tokens]; EOF ends it. Failures answer {"error": ...}."""
    import json
    import sys

    import numpy as np

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints must not corrupt the answers
    train = decode = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "init":
                import torch
                import transformers

                where = "cuda" if msg["jax_platform"] == "gpu" and torch.cuda.is_available() \
                    else "cpu"
                with np.load(msg["arrays"], allow_pickle=False) as z:
                    tokens = z["tokens"]
                    weights = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
                train = _hf_trainer(msg["dims"], tokens, msg["dtype"], msg["seed"],
                                    msg["threads"], where)
                if msg["decode"] is not None:
                    decode = _hf_decoder(msg["dims"], weights, **msg["decode"],
                                         threads=msg["threads"], where=where)
                reply = {"torch_version": torch.__version__, "torch_device": where,
                         "transformers_version": transformers.__version__,
                         "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
            elif msg["op"] == "train":
                u0 = _usage()
                secs = train(msg["n"])
                reply = [secs, *(b - a for a, b in zip(u0, _usage()))]
            else:
                reply = list(decode())
            answer = {"ok": reply}
        except Exception as e:  # the parent turns it into a UserError
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class TorchWorker:
    """The parent's handle on torch_worker: a process started in the environment the user
    launched gpt2jax with (without the huge-page tunable gpt2jax adds for itself, which
    slowed torch's step down by 4-14% here: docs/perf-notes.md section 8)."""

    def __init__(self):
        import subprocess
        import sys
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="gpt2jax-bench-")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from gpt2jax.bench import torch_worker; torch_worker()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=malloc.user_environ())

    def init(self, tokens, weights: dict | None, **kw) -> dict:
        """Build transformers' model (and decoder, with weights) in the worker."""
        import numpy as np

        path = os.path.join(self.tmp.name, "arrays.npz")
        np.savez(path, tokens=tokens, **{f"w/{k}": v for k, v in (weights or {}).items()})
        return self.call("init", arrays=path, **kw)

    def call(self, op: str, **kw):
        """Send one request and return its answer."""
        import json

        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:  # it died (out of memory, a crash): its own stderr says why
            raise UserError(f"--vs hf: the transformers worker process exited with status "
                            f"{self.proc.wait()} (its output above says why)")
        answer = json.loads(line)
        if "error" in answer:
            raise UserError(f"--vs hf: the transformers side failed: {answer['error']}")
        return answer["ok"]

    def close(self) -> None:
        """End the worker: EOF on its stdin, then a kill if it does not exit."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


# ---------------------------------------------------------------- decoding


def _decoder(cfg: GPT2Config, seed: int, new_tokens: int, vs_hf: bool):
    """Our greedy batch-1 decoder (generate.Generator) and, with vs_hf, what transformers
    needs to run `generate` on the same weights. Returns (run, prompt_tokens, new_tokens,
    hf_args or None)."""
    from .generate import Generator, Sampling
    from .hf import to_hf_tensors
    from .model import create_model
    from .tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    prompt = "The meaning of life is"
    ids = tok.encode(prompt)
    new_tokens = min(new_tokens, cfg.n_positions - len(ids))
    if new_tokens < 1:
        raise UserError(f"--decode needs n_positions > {len(ids)} (the prompt's tokens)")
    model = create_model(cfg.replace(dtype="float32"), seed)
    # --dtype bfloat16 decodes with bf16 weights (float32 params stay the source of truth).
    gen = Generator(model, tok, weights_dtype=cfg.dtype)
    greedy = Sampling(greedy=True)

    def ours() -> tuple[float, int]:
        t0 = time.perf_counter()
        s = gen.generate([prompt], sampling=greedy, max_new_tokens=new_tokens, chunk=32)[0]
        return time.perf_counter() - t0, len(s.token_ids)

    hf_args = None
    if vs_hf:
        hf_args = {"weights": to_hf_tensors(model), "ids": ids, "new_tokens": new_tokens,
                   "eos": tok.eos_token_id}
    return ours, len(ids), new_tokens, hf_args


# ---------------------------------------------------------------- the benchmark


def bench_config(preset: str | None = None, **dims) -> GPT2Config:
    """The model config to benchmark: a preset (gpt2, gpt2-medium, ...) or explicit
    dimensions (None = keep the default), dropout off. Default: the 4-layer, 256-wide model."""
    given = {k: v for k, v in dims.items() if v is not None}
    if preset:
        base = GPT2Config.from_preset(preset)
    else:
        base = GPT2Config(n_layer=4, n_embd=256, n_head=4)
    return base.replace(**given, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def run_bench(
    cfg: GPT2Config,
    *,
    batch_size: int = 8,
    seq_len: int = 256,
    steps: int = 10,
    warmup: int = 2,
    rounds: int = 3,
    vs_hf: bool = False,
    decode: bool = False,
    decode_tokens: int = 128,
    peak_size: int = 4096,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark a training step of `cfg` (and optionally transformers and decoding).

    Rounds alternate: peak matmul, one untimed then `steps` timed steps of ours, the same
    for transformers (with vs_hf), decoding (with decode). Every rate is the median over
    rounds. Returns the documented JSON dict.
    """
    _check_args(cfg, batch_size, seq_len, steps, warmup, rounds, decode_tokens, peak_size)
    if decode and cfg.vocab_size <= EOS_ID:
        raise UserError(f"--decode uses the GPT-2 tokenizer ({EOS_ID + 1} tokens) but the model "
                        f"has --vocab-size {cfg.vocab_size}; use the default vocabulary")
    if vs_hf:
        _require_torch()
        # on a GPU, JAX would take 75% of its memory up front and leave the transformers
        # worker the rest; read when JAX creates its GPU client (no effect on CPU)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from .run import for_this_process

    cfg = for_this_process(cfg)
    device = jax.local_devices()[0]
    tokens = _random_tokens(batch_size, seq_len, cfg.vocab_size, seed)
    m = _measure(cfg, tokens, device, steps=steps, warmup=warmup, rounds=rounds, vs_hf=vs_hf,
                 decode_tokens=decode_tokens if decode else 0, peak_size=peak_size, seed=seed,
                 say=log or (lambda _msg: None))
    timed = m["timed"]

    def per_round(key: str) -> list:  # a field of every round, where that side ran
        return [r[key] for r in timed if r[key] is not None]

    fpt, tokens_per_step = flops_per_token(cfg, seq_len), batch_size * seq_len
    peaks, jax_t, hf_t = per_round("peak"), per_round("jax_s"), per_round("hf_s")
    peak = max(peaks)  # the best probe of all rounds (see make_peak_probe)
    jax_res = _side(tokens_per_step, statistics.median(jax_t), fpt, peak, jax_t,
                    per_round("jax_use"))
    jax_res.update(mfu_rounds=_per_round_mfu(tokens_per_step, fpt, jax_t, peaks),
                   compile_seconds=round(m["compile_seconds"], 3),
                   first_step_seconds=round(m["first_step_seconds"], 4),
                   peak_memory_bytes=m["memory"][0], peak_memory_source=m["memory"][1],
                   malloc=malloc.describe())
    hf_res, ratio = None, None
    if vs_hf:
        hf_res = _hf_result(cfg, m, _side(tokens_per_step, statistics.median(hf_t), fpt, peak,
                                          hf_t, per_round("hf_use")), jax_t, hf_t)
        ratio = round(jax_res["tokens_per_sec"] / hf_res["tokens_per_sec"], 3)
    return {
        "config": {**_config_fields(cfg), "batch_size": batch_size, "seq_len": seq_len,
                   "steps": steps, "warmup": warmup, "settle_rounds": m["settle"],
                   "rounds": rounds, "seed": seed},
        "flops_per_token": fpt,
        "peak_flops": round(peak),
        # a step faster than the probe means the probe was slowed down: no MFU then
        "peak_consistent": jax_res["mfu"] is not None,
        "peak_flops_rounds": [round(p) for p in peaks],
        "peak_matmul": {"size": peak_size, "dtype": cfg.dtype, "accumulate": "float32"},
        "jax": jax_res,
        "hf": hf_res,
        "ratio": ratio,
        "decode": _decode_result(cfg, m, per_round("jax_dec"), per_round("hf_dec")),
        "device": describe_device(device),
        "jax_version": jax.__version__,
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES")},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _measure(cfg: GPT2Config, tokens, device, *, steps: int, warmup: int, rounds: int,
             vs_hf: bool, decode_tokens: int, peak_size: int, seed: int,
             say: Callable[[str], None]) -> dict:
    """Compile and warm each side up, settle, then run the timed rounds (`_rounds`).
    decode_tokens 0: no decoding. Returns the rounds and what was learnt on the way."""
    out = {"threads": _cores(), "hf_info": None, "hf_first": 0.0, "prompt_tokens": 0}
    worker = None
    with contextlib.ExitStack() as cleanup:
        if vs_hf:
            # started before our side allocates (forking a small process is cheap)
            worker = TorchWorker()
            cleanup.callback(worker.close)
        batch_size, seq_len = tokens.shape[0], tokens.shape[1] - 1
        say(f"compiling the train step ({cfg.n_layer} layers, n_embd {cfg.n_embd}, "
            f"batch {batch_size} x {seq_len}, {cfg.dtype})")
        out["compile_seconds"], jax_run = _jax_trainer(cfg, tokens, device, seed)
        out["first_step_seconds"] = jax_run(1)
        if warmup > 1:
            jax_run(warmup - 1)
        out["memory"] = peak_memory(device)  # before the probe allocates anything
        our_decode, hf_decode_args = None, None
        if decode_tokens:
            say("compiling the decoder")
            our_decode, out["prompt_tokens"], out["new_tokens"], hf_decode_args = _decoder(
                cfg, seed, decode_tokens, vs_hf)
            our_decode()  # warm-up (compiles)
        if worker is not None:
            say("building the transformers model (in its own process)")
            # pop: the parent does not keep transformers' copy of the weights while timing
            out["hf_info"] = worker.init(
                tokens, hf_decode_args.pop("weights") if hf_decode_args else None,
                dims=hf_dims(cfg), dtype=cfg.dtype, seed=seed, threads=out["threads"],
                jax_platform=device.platform, decode=hf_decode_args)
            out["hf_first"] = worker.call("train", n=1)[0]
            if warmup > 1:
                worker.call("train", n=warmup - 1)
            if hf_decode_args is not None:
                worker.call("decode")  # warm-up
        probe = make_peak_probe(device, cfg.dtype, peak_size)
        out["settle"] = _settle(probe, jax_run, worker, our_decode, steps)
        out["timed"] = _rounds(probe, jax_run, worker, our_decode, steps, rounds,
                               batch_size * seq_len, say)
    return out


def _config_fields(cfg: GPT2Config) -> dict:
    """The model config as the result reports it."""
    return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "dtype": cfg.dtype,
            "remat": cfg.remat, "scan_layers": cfg.scan_layers, "attention": cfg.attention,
            "loss_chunk": cfg.loss_chunk_tokens, "matmul_params": matmul_params(cfg)}


def _hf_result(cfg: GPT2Config, m: dict, side: dict, jax_t: list, hf_t: list) -> dict:
    """transformers' side of the result: its rates (`side`) plus what it ran with."""
    info = m["hf_info"]
    side.update(first_step_seconds=round(m["hf_first"], 4),
                torch_device=info["torch_device"], torch_threads=m["threads"],
                torch_version=info["torch_version"],
                transformers_version=info["transformers_version"],
                compute="bfloat16 autocast" if cfg.dtype == "bfloat16" else "float32",
                env={"GLIBC_TUNABLES": info["glibc_tunables"]},
                malloc=malloc.describe({"GLIBC_TUNABLES": info["glibc_tunables"] or ""}),
                # per-round ratios show how much the background load moved the comparison
                ratio_rounds=[round(h / j, 3) for j, h in zip(jax_t, hf_t)])
    return side


def _decode_result(cfg: GPT2Config, m: dict, jax_rates: list, hf_rates: list) -> dict | None:
    if not jax_rates:
        return None
    prompt, new = m["prompt_tokens"], m["new_tokens"]
    res = {"batch_size": 1, "prompt_tokens": prompt, "new_tokens": new,
           "weights_dtype": cfg.dtype,  # the decoder casts the weights to the compute dtype
           "flops_per_token": decode_flops_per_token(cfg, prompt + new),
           "jax_tokens_per_sec": round(statistics.median(jax_rates), 2),
           "hf_tokens_per_sec": None, "ratio": None}
    if hf_rates:
        res["hf_tokens_per_sec"] = round(statistics.median(hf_rates), 2)
        res["ratio"] = round(res["jax_tokens_per_sec"] / res["hf_tokens_per_sec"], 3)
    return res


def _round(probe, jax_run, worker, our_decode, steps: int) -> dict:
    """One alternating round: the peak probe, then per side one untimed and `steps` timed
    steps, then a greedy decode per side (with `our_decode`; transformers' with `worker`).
    Returns the peak FLOP/s, each side's seconds a step and [CPU seconds, minor page
    faults] a step, and decode tokens/s (None where a side did not run)."""
    r = {"peak": probe(3), "hf_s": None, "hf_use": None, "jax_dec": None, "hf_dec": None}
    # One untimed step per side: the first step after other work (the probe, the other
    # framework's step) pays page faults for memory the allocator returned in between
    # (measured: GPT-2 small's first JAX step after a torch step took 1.6x as long, the
    # next one the usual time). Steady-state training never pays it.
    jax_run(1)
    u0 = _usage()
    r["jax_s"] = jax_run(steps) / steps
    r["jax_use"] = [(b - a) / steps for a, b in zip(u0, _usage())]
    if worker is not None:
        worker.call("train", n=1)
        secs, *use = worker.call("train", n=steps)
        r["hf_s"], r["hf_use"] = secs / steps, [u / steps for u in use]
    if our_decode is not None:
        secs, n = our_decode()
        r["jax_dec"] = n / secs
        if worker is not None:  # the worker was given a decoder whenever we have one
            secs, n = worker.call("decode")
            r["hf_dec"] = n / secs
    return r


def _rounds(probe, jax_run, worker, our_decode, steps: int, rounds: int,
            tokens_per_step: int, say) -> list[dict]:
    """The timed rounds (_round each), with a progress line per round."""
    out = []
    for i in range(rounds):
        r = _round(probe, jax_run, worker, our_decode, steps)
        line = f"round {i + 1}/{rounds}: peak {r['peak'] / 1e9:.1f} GFLOP/s, " \
               f"jax {tokens_per_step / r['jax_s']:,.0f} tokens/s"
        if r["hf_s"] is not None:
            line += f", hf {tokens_per_step / r['hf_s']:,.0f} tokens/s"
        say(line)
        out.append(r)
    return out


def _settle(probe, jax_run, worker, our_decode, steps: int, most: int = 8) -> int:
    """Untimed rounds, the same as the timed ones (_round), until our steps stop faulting
    memory in. With the `keep` malloc policy (gpt2jax/malloc.py) the heap grows until it
    holds every buffer of a round, and a step that grows it pays the kernel's page
    zeroing (GPT-2 small: 5.7 s instead of 3.0). Several steps in a row are dispatched
    asynchronously and overlap, so single warm-up steps do not grow it far enough. Wait
    for a round whose steps fault nothing; other policies fault a steady amount every
    step: wait until the count stops falling. Returns the rounds run."""
    keeping = malloc.keeps_memory()
    last = None
    for n in range(1, most + 1):
        faults = _round(probe, jax_run, worker, our_decode, steps)["jax_use"][1]
        if faults == 0 or (not keeping and last is not None and faults >= last):
            return n
        last = faults
    return most


def _usage() -> tuple[float, int]:
    """(user + system CPU seconds of every thread, minor page faults) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def _side(tokens_per_step: int, step_s: float, fpt: int, peak: float, rounds: list,
          use: list) -> dict:
    tps = tokens_per_step / step_s
    return {"tokens_per_sec": round(tps, 2), "step_seconds": round(step_s, 5),
            "step_seconds_rounds": [round(t, 5) for t in rounds],
            # CPU time per step moves less than wall time when other processes compete
            "cpu_seconds_per_step": round(statistics.median(u[0] for u in use), 5),
            # memory the step faults in afresh (perf-notes section 7: huge pages cut it 100x)
            "page_faults_per_step": round(statistics.median(u[1] for u in use)),
            "flops_per_token": fpt, "achieved_flops": round(tps * fpt),
            "mfu": round(tps * fpt / peak, 4) if tps * fpt <= peak else None}


def _per_round_mfu(tokens_per_step: int, fpt: int, step_times: list, peaks: list) -> list:
    """Each round's MFU against that round's probe (None where the probe read lower than
    the step achieved)."""
    mfu = [tokens_per_step * fpt / (t * p) for t, p in zip(step_times, peaks)]
    return [round(m, 4) if m <= 1 else None for m in mfu]


def _check_args(cfg, batch_size, seq_len, steps, warmup, rounds, decode_tokens,
                peak_size) -> None:
    for name, v, lo in (("--batch-size", batch_size, 1), ("--seq-len", seq_len, 1),
                        ("--steps", steps, 1), ("--warmup", warmup, 1), ("--rounds", rounds, 1),
                        ("--decode-tokens", decode_tokens, 1), ("--peak-size", peak_size, 16)):
        if v < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}")
    if seq_len > cfg.n_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context n_positions="
                        f"{cfg.n_positions}; raise --n-positions or lower --seq-len")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype}: choose one of {', '.join(DTYPES)}")


def format_table(r: dict) -> str:
    """The terminal summary of a run_bench result."""
    c = r["config"]
    lines = [f"{r['device']}  jax {r['jax_version']}  {r['date']}",
             f"model: {c['n_layer']} layers, n_embd {c['n_embd']}, {c['n_head']} heads, "
             f"vocab {c['vocab_size']}; batch {c['batch_size']} x seq {c['seq_len']}, "
             f"{c['dtype']}, attention {c.get('attention', 'explicit')}, loss_chunk "
             f"{c.get('loss_chunk', 0)}; {c['rounds']} rounds x {c['steps']} steps (medians)",
             f"FLOPs/token {r['flops_per_token'] / 1e6:,.1f} M; peak matmul "
             f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_matmul']['size']}^2 "
             f"{r['peak_matmul']['dtype']})", ""]
    head = f"{'':14}{'tokens/s':>12}{'s/step':>10}{'GFLOP/s':>10}{'MFU':>8}"
    lines.append(head)
    for name, side in (("gpt2jax", r["jax"]), ("transformers", r["hf"])):
        if side is None:
            continue
        mfu = "-" if side["mfu"] is None else f"{side['mfu']:.1%}"
        lines.append(f"{name:14}{side['tokens_per_sec']:>12,.0f}{side['step_seconds']:>10.4f}"
                     f"{side['achieved_flops'] / 1e9:>10.1f}{mfu:>8}")
    if not r["peak_consistent"]:
        lines.append("MFU not reported: the matmul probe read below the rate the step achieved "
                     "(the machine was busy while it ran); run again on a quieter machine")
    j = r["jax"]
    lines.append(f"compile {j['compile_seconds']:.2f} s; peak memory "
                 f"{j['peak_memory_bytes'] / 2**20:,.0f} MiB ({j['peak_memory_source']})")
    if r["ratio"] is not None:
        lines.append(f"speed ratio gpt2jax / transformers: {r['ratio']:.2f}x")
    d = r["decode"]
    if d is not None:
        s = f"decode (greedy, batch 1, {d['new_tokens']} tokens): gpt2jax " \
            f"{d['jax_tokens_per_sec']:.1f} tokens/s"
        if d["hf_tokens_per_sec"] is not None:
            s += f", transformers {d['hf_tokens_per_sec']:.1f} tokens/s ({d['ratio']:.2f}x)"
        lines.append(s)
    return "\n".join(lines)


# ---------------------------------------------------------------- --lora


def run_lora_bench(cfg: GPT2Config, rank: int, targets: tuple[str, ...] = ("c_attn",), *,
                   batch_size: int = 8, seq_len: int = 256, steps: int = 10, warmup: int = 2,
                   rounds: int = 3, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict:
    """Full fine-tuning against LoRA of `rank` on `targets` for the same model shape and
    batch: median step seconds over alternating rounds, trainable parameters, optimizer
    state bytes and the compiled step's memory of each side."""
    from .config import LoraSection
    from .run import for_this_process, lora_fields

    _check_args(cfg, batch_size, seq_len, steps, warmup, rounds, 1, 16)
    if rank < 1:
        raise UserError(f"--lora {rank}: the adapters' rank must be >= 1")
    import jax

    say = log or (lambda _msg: None)
    device = jax.local_devices()[0]
    tokens = _random_tokens(batch_size, seq_len, cfg.vocab_size, seed)
    lora = LoraSection(rank=rank, alpha=2.0 * rank, targets=list(targets))
    sides, runs = {}, {}
    for name, section in (("full", None), ("lora", lora)):
        mcfg = for_this_process(cfg.replace(**lora_fields(section)))
        say(f"compiling the {name} fine-tuning step")
        info: dict = {}
        info["compile_seconds"], runs[name] = _jax_trainer(mcfg, tokens, device, seed,
                                                           section, info)
        runs[name](warmup)
        sides[name] = info
    times = {name: [] for name in runs}
    for i in range(rounds):
        for name, run in runs.items():
            times[name].append(run(steps) / steps)
        say(f"round {i + 1}/{rounds}: full {times['full'][-1]:.4f} s/step, lora "
            f"{times['lora'][-1]:.4f} s/step")
    for name, side in sides.items():
        side["step_seconds"] = round(statistics.median(times[name]), 5)
        side["tokens_per_sec"] = round(batch_size * seq_len / side["step_seconds"], 1)
        side["step_seconds_rounds"] = [round(t, 5) for t in times[name]]
    return {"config": {**_config_fields(for_this_process(cfg)), "batch_size": batch_size,
                       "seq_len": seq_len, "steps": steps, "rounds": rounds, "seed": seed},
            "lora": {"rank": rank, "alpha": lora.alpha, "targets": list(targets)},
            "full": sides["full"], "lora_side": sides["lora"],
            "speedup": round(sides["full"]["step_seconds"] / sides["lora"]["step_seconds"], 3),
            "device": describe_device(device), "jax_version": jax.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def format_lora_table(r: dict) -> str:
    """The terminal summary of a run_lora_bench result."""
    c, lo = r["config"], r["lora"]
    lines = [f"{r['device']}  jax {r['jax_version']}  {r['date']}",
             f"model: {c['n_layer']} layers, n_embd {c['n_embd']}, {c['n_head']} heads, vocab "
             f"{c['vocab_size']}; batch {c['batch_size']} x seq {c['seq_len']}, {c['dtype']}; "
             f"{c['rounds']} rounds x {c['steps']} steps (medians)",
             f"LoRA rank {lo['rank']}, alpha {lo['alpha']:g}, targets {', '.join(lo['targets'])}",
             "", f"{'':8}{'trainable':>14}{'optimizer state':>18}{'step temp':>12}"
                 f"{'s/step':>10}{'tokens/s':>11}"]
    for name, side in (("full", r["full"]), ("lora", r["lora_side"])):
        temp = side.get("step_memory_bytes", {}).get("temp")
        lines.append(f"{name:8}{side['trainable_params']:>14,}"
                     f"{side['optimizer_state_bytes'] / 2**20:>15,.2f} MiB"
                     f"{'-' if temp is None else f'{temp / 2**20:,.0f} MiB':>12}"
                     f"{side['step_seconds']:>10.4f}{side['tokens_per_sec']:>11,.0f}")
    lines.append(f"LoRA step speed-up over full fine-tuning: {r['speedup']:.2f}x")
    return "\n".join(lines)
