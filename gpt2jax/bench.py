"""`gpt2jax bench`: the trainer's own step timed on one device, its model FLOPs and MFU
against a matmul peak of the same run, optionally side by side with the peers (peers.py),
greedy decoding and the evaluation forwards, in alternating rounds (medians).
docs/benchmarks.md gives the method, the FLOP convention and the output fields.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import malloc, peers
from .config import OptimSection
from .errors import UserError
from .model import GPT2Config
from .tokenizer import EOS_ID


@dataclass(frozen=True)
class BenchSettings:
    """What a bench run times besides the model: the batch, the rounds and the extra sides
    (peers in `vs`, decoding, evaluation)."""

    batch_size: int = 8
    seq_len: int = 256
    steps: int = 10
    warmup: int = 2
    rounds: int = 3
    seed: int = 0
    vs: tuple[str, ...] = ()
    decode: bool = False
    decode_tokens: int = 128
    evaluate: bool = False
    peak_size: int = 4096

    def check(self, cfg: GPT2Config) -> None:
        """UserError, named by the command-line flag, for a value out of range."""
        for name, lo in (("batch_size", 1), ("seq_len", 1), ("steps", 1), ("warmup", 1),
                         ("rounds", 1), ("decode_tokens", 1), ("peak_size", 16)):
            if getattr(self, name) < lo:
                raise UserError(f"--{name.replace('_', '-')} must be >= {lo}, "
                                f"got {getattr(self, name)}")
        if self.seq_len > cfg.n_positions:
            raise UserError(f"--seq-len {self.seq_len} exceeds the model's context n_positions="
                            f"{cfg.n_positions}; raise --n-positions or lower --seq-len")


# ---------------------------------------------------------------- FLOP accounting (pure)


def matmul_params(cfg: GPT2Config) -> int:
    """Parameters that take part in a matmul per token: the blocks' four weight matrices
    and the LM head (tied to wte, counted once); no biases, LayerNorms or position table."""
    d, f = cfg.n_embd, cfg.inner
    per_layer = d * 3 * d + d * d + d * f + f * d
    return cfg.n_layer * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: GPT2Config, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward), the PaLM convention: 6N + 12
    * n_layer * n_embd * seq_len (docs/benchmarks.md, "FLOP convention")."""
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
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_device(device) -> str:
    """A one-line description of the device (CPU model and core count on CPU)."""
    if device.platform == "cpu":
        return f"cpu: {_cpu_name()}, {_cores()} cores"
    return f"{device.platform}: {device.device_kind}"


def peak_memory(device) -> tuple[int, str]:
    """(bytes, source): the device's peak_bytes_in_use when it reports memory stats
    (GPU/TPU), else the process's maximum resident set size (CPU)."""
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss if platform.system() == "Darwin" else rss * 1024), "process_max_rss"


# ---------------------------------------------------------------- peak matmul rate


def make_peak_probe(device, dtype: str, size: int) -> Callable[[int], float]:
    """A function reps -> FLOP/s of a jitted (size x size) @ (size x size) matmul in `dtype`
    (float32 accumulation), compiled and warmed on creation. The fastest of reps counts:
    other load only ever slows a repetition down."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype), device)
            for k in jax.random.split(jax.random.key(0)))
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


def _jax_trainer(cfg: GPT2Config, tokens, device, seed: int, lora=None):
    """The trainer's step (its default AdamW chain, dropout off) on one device. Returns
    (compile_seconds, run(n) -> seconds, `_step_sizes`). `lora`: a model.lora section (cfg
    then has its adapters): only they train."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from .model import create_model
    from .optim import frozen_names, make_optimizer
    from .train import make_train_step

    with jax.default_device(device):
        graphdef, params = nnx.split(create_model(cfg, seed))
    params = jax.device_put(params, device)
    tx, _ = make_optimizer(OptimSection(), 1_000_000, params, lora)
    opt_state = jax.jit(tx.init)(params)
    frozen = frozen_names(OptimSection(), lora, params)
    step_fn = make_train_step(graphdef, tx, False, 1, jax.random.key(seed), frozen=frozen)
    jitted = jax.jit(step_fn, donate_argnums=(0, 1))
    batch = jax.device_put({"tokens": tokens[None],
                            "weights": np.ones((1, *tokens.shape), np.float32)}, device)
    step0 = jax.device_put(jnp.int32(0), device)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, batch, step0).compile()
    compile_seconds = time.perf_counter() - t0
    sizes = _step_sizes(params, opt_state, compiled, frozen or frozenset())
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

    return compile_seconds, run, sizes


def _step_sizes(params, opt_state, compiled, frozen: frozenset) -> dict:
    """Trainable parameters, optimizer-state bytes and the compiled step's memory (XLA's
    memory analysis: arguments, outputs, temporaries)."""
    import jax

    from .params import flat

    sizes = {"trainable_params": sum(int(v.size) for k, v in flat(params).items()
                                     if k not in frozen),
             "optimizer_state_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(opt_state))}
    mem = compiled.memory_analysis()
    if mem is not None:
        sizes["step_memory_bytes"] = {
            k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp")}
    return sizes


# ---------------------------------------------------------------- decoding


def _decoder(cfg: GPT2Config, seed: int, new_tokens: int, vs_hf: bool):
    """Our greedy batch-1 decoder (generate.Generator), compiled and warmed, and with vs_hf
    what transformers needs to run `generate` on the same weights. Returns (run, what is
    decoded as the result reports it, hf_args or None)."""
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

    ours()
    hf_args = None
    if vs_hf:
        hf_args = {"weights": to_hf_tensors(model), "ids": ids, "new_tokens": new_tokens,
                   "eos": tok.eos_token_id}
    decoded = {"batch_size": 1, "prompt_tokens": len(ids), "new_tokens": new_tokens,
               "weights_dtype": cfg.dtype,  # the decoder casts the weights to the compute dtype
               "flops_per_token": decode_flops_per_token(cfg, len(ids) + new_tokens)}
    return ours, decoded, hf_args


# ---------------------------------------------------------------- evaluation


EVAL_LABELS = 4  # the classification path's head: GPT2ForSequenceClassification, 4 labels


def _evaluators(cfg: GPT2Config, tokens, seed: int, reps: int) -> dict[str, Callable]:
    """The forward passes `gpt2jax eval` runs, on the bench's batch: "lm" scores every
    token (evaluate.token_logprobs: the perplexity path), "classification" takes a
    sequence-classification head's probabilities (evaluate.class_probabilities). Each
    run() -> (seconds, tokens or examples) for `reps` batches; compiled and warmed."""
    import jax
    import numpy as np

    from .evaluate import class_probabilities, token_logprobs
    from .model import create_model

    ids = tokens[:, :-1]
    mask = np.ones_like(ids)
    lm = create_model(cfg, seed)
    cls = create_model(cfg.replace(head="sequence", num_labels=EVAL_LABELS,
                                   pad_token_id=EOS_ID), seed)
    runs = {"lm": peers.rep_timer(lambda: token_logprobs(lm, ids, mask), reps, ids.size,
                                  jax.block_until_ready),
            "classification": peers.rep_timer(lambda: class_probabilities(cls, ids, mask),
                                              reps, ids.shape[0], jax.block_until_ready)}
    for run in runs.values():
        run()
    return runs


def _vs_hf(timed: list, kind: str, unit: str) -> dict:
    """Our and transformers' rates of a forward `kind` (medians over rounds) and their ratio."""
    ours = statistics.median(r["forward"][kind][0] for r in timed)
    hf = [r["forward"][kind][1] for r in timed if r["forward"][kind][1] is not None]
    res = {f"jax_{unit}_per_sec": round(ours, 2), f"hf_{unit}_per_sec": None, "ratio": None}
    if hf:
        res[f"hf_{unit}_per_sec"] = round(statistics.median(hf), 2)
        res["ratio"] = round(ours / statistics.median(hf), 3)
    return res


# ---------------------------------------------------------------- the benchmark


def bench_config(preset: str | None = None, **dims) -> GPT2Config:
    """The model config to benchmark: a preset (gpt2, gpt2-medium, ...) or explicit
    dimensions (None = keep the default), dropout off. Default: the 4-layer, 256-wide model."""
    given = {k: v for k, v in dims.items() if v is not None}
    base = (GPT2Config.from_preset(preset) if preset
            else GPT2Config(n_layer=4, n_embd=256, n_head=4))
    return base.replace(**given, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def run_bench(cfg: GPT2Config, s: BenchSettings = BenchSettings(),
              log: Callable[[str], None] | None = None) -> dict:
    """Benchmark a training step of `cfg` (and optionally its peers, decoding, evaluation)
    in alternating rounds (`_round`), medians over rounds; the JSON dict of
    docs/benchmarks.md."""
    s.check(cfg)
    if s.decode and cfg.vocab_size <= EOS_ID:
        raise UserError(f"--decode uses the GPT-2 tokenizer ({EOS_ID + 1} tokens) but the model "
                        f"has --vocab-size {cfg.vocab_size}; use the default vocabulary")
    for peer in s.vs:
        peers.require(peer)
    if s.vs:
        # on a GPU, JAX would take 75% of its memory up front and leave the peers' workers
        # the rest; read when JAX creates its GPU client (no effect on CPU)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from .run import for_this_process

    cfg = for_this_process(cfg)
    device = jax.local_devices()[0]
    m = _measure(cfg, device, s, log or (lambda _msg: None))
    timed = m["timed"]
    fpt, tokens_per_step = flops_per_token(cfg, s.seq_len), s.batch_size * s.seq_len
    peaks = [r["peak"] for r in timed]
    peak = max(peaks)  # the best probe of all rounds (see make_peak_probe)
    times = {name: [r["train"][name][0] for r in timed] for name in ("jax", *s.vs)}
    sides = {name: _side(tokens_per_step, statistics.median(t), fpt, peak, t,
                         [r["train"][name][1] for r in timed]) for name, t in times.items()}
    jax_res = sides.pop("jax")
    jax_res.update(mfu_rounds=_per_round_mfu(tokens_per_step, fpt, times["jax"], peaks),
                   compile_seconds=round(m["compile_seconds"], 3),
                   first_step_seconds=round(m["first"]["jax"], 4),
                   peak_memory_bytes=m["memory"][0], peak_memory_source=m["memory"][1],
                   malloc=malloc.describe())
    for peer, side in sides.items():
        _peer_fields(cfg, peer, side, m, times)
    ratios = {p: round(jax_res["tokens_per_sec"] / side["tokens_per_sec"], 3)
              for p, side in sides.items()}
    return {
        "config": {**_config_fields(cfg), "batch_size": s.batch_size, "seq_len": s.seq_len,
                   "steps": s.steps, "warmup": s.warmup, "settle_rounds": m["settle"],
                   "rounds": s.rounds, "seed": s.seed},
        "flops_per_token": fpt,
        "peak_flops": round(peak),
        # a step faster than the probe means the probe was slowed down: no MFU then
        "peak_consistent": jax_res["mfu"] is not None,
        "peak_flops_rounds": [round(p) for p in peaks],
        "peak_matmul": {"size": s.peak_size, "dtype": cfg.dtype, "accumulate": "float32"},
        "jax": jax_res,
        **{p: sides.get(p) for p in peers.PEERS},
        "ratio": ratios.get("hf"),
        "ratios": ratios,
        "decode": {**m["decoded"], **_vs_hf(timed, "decode", "tokens")} if s.decode else None,
        "eval": {kind: _vs_hf(timed, kind, unit) for kind, unit in
                 (("lm", "tokens"), ("classification", "examples"))} if s.evaluate else None,
        "device": describe_device(device),
        "jax_version": jax.__version__,
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES")},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _measure(cfg: GPT2Config, device, s: BenchSettings, say: Callable[[str], None]) -> dict:
    """Compile and warm each side up, settle, then run the timed rounds. Returns the
    rounds and what was learnt on the way."""
    out = {"threads": _cores(), "info": {}, "first": {}}
    train: dict[str, Callable[[int], list]] = {}  # side -> run(n) -> [s, CPU s, faults]
    tokens = _random_tokens(s.batch_size, s.seq_len, cfg.vocab_size, s.seed)

    def warm_up(name: str) -> None:
        out["first"][name] = train[name](1)[0]
        if s.warmup > 1:
            train[name](s.warmup - 1)

    with contextlib.ExitStack() as cleanup:
        # started before our side allocates (forking a small process is cheap)
        workers = {p: cleanup.enter_context(contextlib.closing(peers.Worker(p))) for p in s.vs}
        say(f"compiling the train step ({cfg.n_layer} layers, n_embd {cfg.n_embd}, "
            f"batch {s.batch_size} x {s.seq_len}, {cfg.dtype})")
        out["compile_seconds"], jax_run, _ = _jax_trainer(cfg, tokens, device, s.seed)
        train["jax"] = functools.partial(peers.measured, jax_run)
        warm_up("jax")
        out["memory"] = peak_memory(device)  # before the probe allocates anything
        forwards, hf_decode_args = {}, None  # kind -> run() -> (seconds, tokens or examples)
        if s.decode:
            say("compiling the decoder")
            forwards["decode"], out["decoded"], hf_decode_args = _decoder(
                cfg, s.seed, s.decode_tokens, "hf" in workers)
        if s.evaluate:
            say("compiling the evaluation forwards")
            forwards.update(_evaluators(cfg, tokens, s.seed, s.steps))
        for peer, worker in workers.items():
            say(f"building the {worker.name} model (in its own process)")
            decode_args = hf_decode_args if peer == "hf" else None
            # pop: the parent does not keep transformers' copy of the weights while timing
            out["info"][peer] = worker.init(
                tokens, decode_args.pop("weights") if decode_args else None,
                dims=peers.hf_dims(cfg), dtype=cfg.dtype, seed=s.seed, threads=out["threads"],
                jax_platform=device.platform, decode=decode_args,
                evaluate={"reps": s.steps, "num_labels": EVAL_LABELS} if s.evaluate else None)
            train[peer] = lambda n, w=worker: w.call("train", n=n)
            warm_up(peer)
            for kind in forwards if peer == "hf" else ():
                worker.call("eval", kind=kind)  # warm-up
        one_round = functools.partial(_round, make_peak_probe(device, cfg.dtype, s.peak_size),
                                      train, forwards, workers.get("hf"), s.steps)
        out["settle"] = _settle(one_round)
        out["timed"] = []
        for i in range(s.rounds):
            r = one_round()
            say(f"round {i + 1}/{s.rounds}: peak {r['peak'] / 1e9:.1f} GFLOP/s, " + ", ".join(
                f"{name} {s.batch_size * s.seq_len / secs:,.0f} tokens/s"
                for name, (secs, _) in r["train"].items()))
            out["timed"].append(r)
    return out


def _config_fields(cfg: GPT2Config) -> dict:
    """The model config as the result reports it."""
    return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "dtype": cfg.dtype,
            "remat": cfg.remat, "scan_layers": cfg.scan_layers, "attention": cfg.attention,
            "kernels": cfg.kernels, "loss_chunk": cfg.loss_chunk_tokens,
            "matmul_params": matmul_params(cfg)}


_BF16_COMPUTE = {"hf": "bfloat16 autocast", "keras": "mixed_bfloat16"}  # each peer's bf16


def _peer_fields(cfg: GPT2Config, peer: str, side: dict, m: dict, times: dict) -> None:
    """Add to a peer's side of the result what it ran with and its per-round ratios."""
    info = dict(m["info"][peer])
    tunables = info.pop("glibc_tunables")
    if peer == "hf":
        side["torch_threads"] = m["threads"]
    side["compute"] = _BF16_COMPUTE[peer] if cfg.dtype == "bfloat16" else "float32"
    side.update(first_step_seconds=round(m["first"][peer], 4), **info,
                env={"GLIBC_TUNABLES": tunables},
                malloc=malloc.describe({"GLIBC_TUNABLES": tunables or ""}),
                # per-round ratios show how much the background load moved the comparison
                ratio_rounds=[round(h / j, 3) for j, h in zip(times["jax"], times[peer])])


def _round(probe: Callable, trains: dict, forwards: dict, hf: peers.Worker | None,
           steps: int) -> dict:
    """One alternating round: the peak probe; per side (`trains`: name -> train(n), ours
    first) one untimed and `steps` timed steps; each forward (a greedy decode, evaluation),
    ours then transformers' when its worker `hf` runs. Returns the peak FLOP/s, per side
    (seconds, [CPU seconds, minor page faults]) a step and per forward (our rate,
    transformers' or None)."""
    r = {"peak": probe(3), "train": {}, "forward": {}}
    for name, train in trains.items():
        # The first step after other work (the probe, another side's step) pays page
        # faults for memory the allocator returned in between (measured: GPT-2 small's
        # first JAX step after a torch step took 1.6x as long); steady training never does.
        train(1)
        secs, *use = train(steps)
        r["train"][name] = (secs / steps, [u / steps for u in use])
    for kind, run in forwards.items():
        secs, n = run()
        theirs = hf.call("eval", kind=kind) if hf is not None else None
        r["forward"][kind] = (n / secs, theirs and theirs[1] / theirs[0])
    return r


def _settle(one_round: Callable[[], dict], most: int = 8) -> int:
    """Untimed rounds until our steps fault no memory in (under `keep`'s growing heap), or
    with another malloc policy until the count stops falling; returns how many."""
    keeping = malloc.keeps_memory()
    last = None
    for n in range(1, most + 1):
        faults = one_round()["train"]["jax"][1][1]
        if faults == 0 or (not keeping and last is not None and faults >= last):
            return n
        last = faults
    return most


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


def _header(r: dict, more: str = "") -> list[str]:
    """Both tables' first lines: the machine and date; the model, batch and rounds."""
    c = r["config"]
    return [f"{r['device']}  jax {r['jax_version']}  {r['date']}",
            f"model: {c['n_layer']} layers, n_embd {c['n_embd']}, {c['n_head']} heads, vocab "
            f"{c['vocab_size']}; batch {c['batch_size']} x seq {c['seq_len']}, {c['dtype']}"
            f"{more}; {c['rounds']} rounds x {c['steps']} steps (medians)"]


def format_table(r: dict) -> str:
    """The terminal summary of a run_bench result."""
    c = r["config"]
    lines = _header(r, f", attention {c.get('attention', 'explicit')}, kernels "
                       f"{c.get('kernels', 'custom')}, loss_chunk {c.get('loss_chunk', 0)}")
    lines += [f"FLOPs/token {r['flops_per_token'] / 1e6:,.1f} M; peak matmul "
              f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_matmul']['size']}^2 "
              f"{r['peak_matmul']['dtype']})", "",
              f"{'':14}{'tokens/s':>12}{'s/step':>10}{'GFLOP/s':>10}{'MFU':>8}"]
    for name, side in (("gpt2jax", r["jax"]), *((n, r.get(p)) for p, n in peers.PEERS.items())):
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
    for peer, ratio in r.get("ratios", {}).items():
        lines.append(f"speed ratio gpt2jax / {peers.PEERS[peer]}: {ratio:.2f}x")
    d = r["decode"]
    if d is not None:
        s = f"decode (greedy, batch 1, {d['new_tokens']} tokens): gpt2jax " \
            f"{d['jax_tokens_per_sec']:.1f} tokens/s"
        if d["hf_tokens_per_sec"] is not None:
            s += f", transformers {d['hf_tokens_per_sec']:.1f} tokens/s ({d['ratio']:.2f}x)"
        lines.append(s)
    for kind, e in (r.get("eval") or {}).items():
        unit = "tokens" if kind == "lm" else "examples"
        s = f"eval {kind} (forward, no grad): gpt2jax {e[f'jax_{unit}_per_sec']:,.1f} {unit}/s"
        if e["ratio"] is not None:
            s += f", transformers {e[f'hf_{unit}_per_sec']:,.1f} ({e['ratio']:.2f}x)"
        lines.append(s)
    return "\n".join(lines)


# ---------------------------------------------------------------- --lora


def run_lora_bench(cfg: GPT2Config, rank: int, targets: tuple[str, ...] = ("c_attn",),
                   s: BenchSettings = BenchSettings(),
                   log: Callable[[str], None] | None = None) -> dict:
    """Full fine-tuning against LoRA of `rank` on `targets` for the same model shape and
    batch: median step seconds over alternating rounds, trainable parameters, optimizer
    state bytes and the compiled step's memory of each side."""
    from .config import LoraSection
    from .run import for_this_process, lora_fields

    s.check(cfg)
    if rank < 1:
        raise UserError(f"--lora {rank}: the adapters' rank must be >= 1")
    import jax

    say = log or (lambda _msg: None)
    device = jax.local_devices()[0]
    tokens = _random_tokens(s.batch_size, s.seq_len, cfg.vocab_size, s.seed)
    lora = LoraSection(rank=rank, alpha=2.0 * rank, targets=list(targets))
    sides, runs = {}, {}
    for name, section in (("full", None), ("lora", lora)):
        mcfg = for_this_process(cfg.replace(**lora_fields(section)))
        say(f"compiling the {name} fine-tuning step")
        compile_seconds, runs[name], sizes = _jax_trainer(mcfg, tokens, device, s.seed, section)
        runs[name](s.warmup)
        sides[name] = {"compile_seconds": compile_seconds, **sizes}
    times = {name: [] for name in runs}
    for i in range(s.rounds):
        for name, run in runs.items():
            times[name].append(run(s.steps) / s.steps)
        say(f"round {i + 1}/{s.rounds}: full {times['full'][-1]:.4f} s/step, lora "
            f"{times['lora'][-1]:.4f} s/step")
    for name, side in sides.items():
        side["step_seconds"] = round(statistics.median(times[name]), 5)
        side["tokens_per_sec"] = round(s.batch_size * s.seq_len / side["step_seconds"], 1)
        side["step_seconds_rounds"] = [round(t, 5) for t in times[name]]
    return {"config": {**_config_fields(for_this_process(cfg)), "batch_size": s.batch_size,
                       "seq_len": s.seq_len, "steps": s.steps, "rounds": s.rounds,
                       "seed": s.seed},
            "lora": {"rank": rank, "alpha": lora.alpha, "targets": list(targets)},
            "full": sides["full"], "lora_side": sides["lora"],
            "speedup": round(sides["full"]["step_seconds"] / sides["lora"]["step_seconds"], 3),
            "device": describe_device(device), "jax_version": jax.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def format_lora_table(r: dict) -> str:
    """The terminal summary of a run_lora_bench result."""
    lo = r["lora"]
    lines = _header(r) + [
        f"LoRA rank {lo['rank']}, alpha {lo['alpha']:g}, targets {', '.join(lo['targets'])}",
        "", f"{'':8}{'trainable':>14}{'optimizer state':>18}{'step temp':>12}{'s/step':>10}"
            f"{'tokens/s':>11}"]
    for name, side in (("full", r["full"]), ("lora", r["lora_side"])):
        temp = side.get("step_memory_bytes", {}).get("temp")
        lines.append(f"{name:8}{side['trainable_params']:>14,}"
                     f"{side['optimizer_state_bytes'] / 2**20:>15,.2f} MiB"
                     f"{'-' if temp is None else f'{temp / 2**20:,.0f} MiB':>12}"
                     f"{side['step_seconds']:>10.4f}{side['tokens_per_sec']:>11,.0f}")
    lines.append(f"LoRA step speed-up over full fine-tuning: {r['speedup']:.2f}x")
    return "\n".join(lines)
