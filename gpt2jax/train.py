"""The training loop: jitted, sharded step; evaluation; checkpoints; logs; preemption.

A step is a pure function of (params, opt_state, batch, step): dropout keys are folded
from the seed and the step, and the batch of a step depends only on the seed and the
step, so a run resumed from any checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import Config, save_config
from .errors import UserError
from .model import GPT2Config


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved. The CLI exits with status 143."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"preempted: saved checkpoint at step {step} to {path}")
        self.step, self.path = step, path


ARCH_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


def model_config(cfg: Config, source: GPT2Config | None, labels: tuple[str, ...]) -> GPT2Config:
    """The model's config from the model section, the init source and the data's labels."""
    m = cfg.model
    explicit = {k: getattr(m, k) for k in ARCH_KEYS if getattr(m, k) is not None}
    if source is None:
        base = GPT2Config.from_preset(m.preset) if m.preset else GPT2Config()
        base = base.replace(**explicit)
    else:
        if m.preset:
            preset = GPT2Config.from_preset(m.preset)
            explicit = {**{k: getattr(preset, k) for k in ("n_layer", "n_embd", "n_head")},
                        **explicit}
        clash = {k: (v, getattr(source, k)) for k, v in explicit.items()
                 if getattr(source, k) != v}
        if clash:
            desc = ", ".join(f"model.{k}={a} but the source has {b}" for k, (a, b) in clash.items())
            raise UserError(f"model.init={m.init} fixes the architecture: {desc}; "
                            "remove these keys or use model.init=scratch")
        base = source
    fields = dict(head=m.head, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
                  classifier_dropout=m.classifier_dropout, attention=m.attention,
                  loss_chunk=m.loss_chunk)
    if m.dropout is not None:
        fields.update(embd_pdrop=m.dropout, attn_pdrop=m.dropout, resid_pdrop=m.dropout)
    if m.head != "lm":
        num = m.num_labels or len(labels)
        if labels and num != len(labels):
            raise UserError(f"model.num_labels={num} but the data has {len(labels)} labels "
                            f"{list(labels)}")
        fields.update(num_labels=num, labels=tuple(labels),
                      pad_token_id=base.eos_token_id)
    out = base.replace(**fields)
    if cfg.data.task != "classification" and cfg.train.seq_len > out.n_positions:
        raise UserError(f"train.seq_len={cfg.train.seq_len} exceeds the model's context "
                        f"n_positions={out.n_positions}; lower train.seq_len")
    return out


def _fault(kind: str, step: int) -> None:
    """Test hook: GPT2JAX_FAULT=kill@step:N or kill@save:N sends this process SIGKILL;
    term@step:N sends SIGTERM (a preemption at a known step, whatever the scheduling)."""
    spec = os.environ.get("GPT2JAX_FAULT", "")
    for action, sig in (("kill", signal.SIGKILL), ("term", signal.SIGTERM)):
        if spec == f"{action}@{kind}:{step}":
            os.kill(os.getpid(), sig)


def _check_run_dir(run: Path) -> None:
    import tempfile

    try:
        run.mkdir(parents=True, exist_ok=True)
        # a probe of its own: every process of a multi-process run checks the same directory
        with tempfile.NamedTemporaryFile(dir=run, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"train.run_dir={run} is not writable ({e.strerror}); "
                        "choose another directory") from e


def _model_json(mcfg: GPT2Config) -> dict:
    d = asdict(mcfg)
    d.pop("extra", None)
    d["labels"] = list(mcfg.labels)
    return d


def train(cfg: Config) -> dict:
    """Train (or resume) the run in cfg.train.run_dir. Returns a summary dict."""
    from . import distributed

    d = cfg.dist  # before any other JAX call
    # by name: dist also holds settings initialize does not take (data_timeout)
    dist = distributed.initialize(
        coordinator=d.coordinator, num_processes=d.num_processes, process_id=d.process_id,
        timeout=d.timeout, local_device_count=d.local_device_count)

    import jax
    import jax.numpy as jnp

    from .batches import Batcher
    from .checkpoint import Checkpoints
    from .optim import update_count
    from .sharding import (
        data_parallel_size,
        global_batch,
        make_mesh,
    )
    from .tracking import Tracker, plot_loss

    t_start = time.time()
    t = cfg.train
    main_process = jax.process_index() == 0
    run = Path(t.run_dir)
    _check_run_dir(run)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    dp = data_parallel_size(mesh)
    micro = t.batch_size // t.grad_accum
    if micro % dp:
        raise UserError(f"train.batch_size={t.batch_size} / grad_accum={t.grad_accum} = {micro} "
                        f"sequences per micro-batch is not divisible by the data-parallel size "
                        f"mesh.data x mesh.fsdp = {dp}")

    # ---- model source, tokenizer, data
    source_model, tokenizer = None, None
    resume = (run / "model.json").is_file() and (run / "checkpoints").is_dir()
    if cfg.model.init != "scratch" and not resume:
        from .sources import load_model

        source_model, tokenizer, _ = load_model(cfg.model.init)
    if tokenizer is None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(run / "tokenizer" if (run / "tokenizer").is_dir() else None)
    if cfg.data.add_special_tokens:
        from .tasks import with_special_tokens

        tokenizer = with_special_tokens(tokenizer, cfg.data.add_special_tokens)
        if cfg.model.init == "scratch" and cfg.model.vocab_size is None:
            base_vocab = GPT2Config.from_preset(cfg.model.preset).vocab_size \
                if cfg.model.preset else GPT2Config().vocab_size
            cfg.model.vocab_size = max(base_vocab, len(tokenizer))
    old_labels = ()
    if resume:
        old = json.loads((run / "model.json").read_text())
        old_labels = tuple(old.get("labels") or ())
    eos = tokenizer.eos_token_id
    prepared = _prepare_data(cfg, tokenizer, eos, old_labels)
    if source_model is not None:
        mcfg = model_config(cfg, source_model.cfg, prepared.labels)
    elif resume:
        old.pop("labels", None)
        src = GPT2Config(**{k: v for k, v in old.items() if k in GPT2Config.__dataclass_fields__})
        mcfg = model_config(cfg, None, prepared.labels)
        changed = {k: (getattr(src, k), getattr(mcfg, k)) for k in (*ARCH_KEYS, "head")
                   if getattr(src, k) != getattr(mcfg, k)}
        if cfg.model.init != "scratch":
            mcfg = model_config(cfg, src.replace(head="lm"), prepared.labels)
            changed = {}
        if changed:
            desc = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(f"{run} holds a run with other model dimensions ({desc}); "
                            "resume with the same model settings or choose a new train.run_dir")
    else:
        mcfg = model_config(cfg, None, prepared.labels)
    if source_model is not None and cfg.data.add_special_tokens and \
            mcfg.vocab_size < len(tokenizer):
        mcfg = mcfg.replace(vocab_size=len(tokenizer))  # new rows: see _initial_params
    if mcfg.vocab_size < len(tokenizer):
        raise UserError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                        f"{len(tokenizer)} tokens; raise model.vocab_size (GPT-2: 50257)")

    batcher = Batcher(prepared.train, t.batch_size, t.seed, jax.process_index(),
                      jax.process_count(), pad_id=eos, max_len=min(t.seq_len, mcfg.n_positions))
    total = t.steps or max(1, math.ceil(t.epochs * batcher.steps_per_epoch()))

    if main_process:
        save_config(cfg, run / "config.yaml")
        (run / "model.json").write_text(json.dumps(_model_json(mcfg), indent=2) + "\n")
        if not (run / "tokenizer").is_dir():
            tokenizer.save_pretrained(str(run / "tokenizer"))

    # ---- parameters, optimizer, shardings
    class_weights = None
    if cfg.data.task == "classification" and t.class_weights == "balanced":
        from .tasks import balanced_class_weights

        class_weights = balanced_class_weights(prepared.train.labels, len(prepared.labels))
    plan = build_step(cfg, mcfg, mesh, total, class_weights=class_weights)
    graphdef, abstract, param_sh = plan.graphdef, plan.abstract_params, plan.param_sh
    tx, schedule, abstract_opt, opt_sh = plan.tx, plan.schedule, plan.abstract_opt, plan.opt_sh

    classification = cfg.data.task == "classification"
    best_key = t.best_metric or ("accuracy" if classification else "loss")
    best_mode = "max" if classification and best_key != "loss" else "min"
    ckpts = Checkpoints(run, t.keep_checkpoints)
    start, best = 0, None
    got = (None, None)
    if ckpts.steps():
        # Restore straight into the target shardings: no throwaway random init.
        got = ckpts.restore_latest_good(abstract, abstract_opt, param_sh, opt_sh)
    if got[0] is not None:
        start, (params, opt_state, meta) = got
        best = meta.get("best")
        if main_process:
            print(f"gpt2jax: resuming {run} from step {start}", file=sys.stderr)
    else:
        params = _initial_params(mcfg, t.seed, source_model, param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    source_model = None
    tracker = Tracker(run, main_process, resume_step=start)
    tracker.log(start, prepared.stats, split="data")  # bytes_per_token, documents, ...
    step_fn, eval_fn = plan.train_step, plan.eval_step

    def to_global(local: dict) -> dict:
        shaped = {k: v.reshape(t.grad_accum, -1, *v.shape[1:]) for k, v in local.items()}
        return global_batch(mesh, shaped, leading=1)  # after the grad-accum axis

    stop_signal = {"term": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop_signal.update(term=True)) \
        if _main_thread() else None

    def save(step: int, metrics: dict | None = None) -> None:
        meta = {"step": step, "data_position": step, "seed": t.seed, "best": best,
                "rng": f"fold_in(key({t.seed}), step)", "metrics": metrics or {}}
        ckpts.save(step, params, opt_state, meta)
        _fault("save", step)

    def evaluate_now(step: int) -> dict | None:
        if prepared.validation is None:
            return None
        res = run_eval(eval_fn, params, prepared.validation, t, mesh, classification,
                       prepared.labels, eos, min(t.seq_len, mcfg.n_positions))
        tracker.log(step, res, split="validation")
        return res

    progress = _Progress(t.progress, total, start, main_process)
    summary: dict = {"run_dir": str(run), "start_step": start, "total_steps": total,
                     "processes": dist.num_processes if dist else 1,
                     "mesh": dict(mesh.shape)}
    last_loss, last_eval = None, None
    window_t0, window_wait, window_steps = time.perf_counter(), 0.0, 0
    pending = None  # metrics of the step in flight, read one step late to keep dispatch async
    bad_steps = 0
    step = start
    try:
        for step, local, waited in batcher.iterate(start, total):
            window_wait += waited
            batch = to_global(local)
            params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step))
            if pending is not None:
                m, bad_steps = _account(pending, bad_steps, t.skip_nonfinite)
                last_loss = float(m["loss"])
            pending = (step, metrics)
            done = step + 1
            window_steps += 1
            if t.log_every and (done % t.log_every == 0 or done == total):
                m, bad_steps = _account(pending, bad_steps, t.skip_nonfinite)
                last_loss, pending = float(m["loss"]), None
                dt = time.perf_counter() - window_t0
                # the rate of the last applied update (skipped steps do not advance it)
                lr = float(schedule(max(update_count(opt_state) - 1, 0)))
                row = {"loss": float(m["loss"]), "lr": lr,
                       "grad_norm": float(m["grad_norm"]),
                       "tokens_per_sec": (window_steps * t.batch_size * t.seq_len) / dt,
                       "steps_per_sec": window_steps / dt,
                       "data_wait_fraction": window_wait / dt}
                if classification:
                    row.pop("tokens_per_sec")
                    row["examples_per_sec"] = window_steps * t.batch_size / dt
                tracker.log(done, row)
                progress.update(done, row)
                window_t0, window_wait, window_steps = time.perf_counter(), 0.0, 0
            _fault("step", done)
            if t.eval_every and done % t.eval_every == 0 and done != total:
                last_eval = evaluate_now(done)
                best = _update_best(best, last_eval, done, best_key, best_mode)
            if t.sample_every and t.sample_prompts and done % t.sample_every == 0:
                write_samples(params, graphdef, tokenizer, t, done, tracker, run, main_process)
            periodic = t.checkpoint_every and done % t.checkpoint_every == 0 and done != total
            if periodic:
                save(done, last_eval)
            if _any_process(stop_signal["term"], done):
                if not periodic:  # Orbax refuses to save a step twice
                    save(done, last_eval)
                ckpts.close()
                raise Preempted(done, ckpts.dir / str(done))
        if pending is not None:
            m, bad_steps = _account(pending, bad_steps, t.skip_nonfinite)
            last_loss = float(m["loss"])
        step = total
        last_eval = evaluate_now(total)  # None without a validation split
        best = _update_best(best, last_eval, total, best_key, best_mode)
        if start < total:
            save(total, last_eval)
        ckpts.close()
    finally:
        progress.close()
        tracker.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        try:
            ckpts.close()
        except Exception:
            pass
    if main_process:
        plot_loss(run)
        if classification and last_eval and "confusion_matrix" in last_eval:
            from .evaluate import plot_confusion_matrix

            plot_confusion_matrix(last_eval["confusion_matrix"], prepared.labels,
                                  run / "confusion_matrix.png")
    summary.update(final_step=step, train_loss=last_loss, validation=last_eval, best=best,
                   data=prepared.stats, wall_seconds=round(time.time() - t_start, 1),
                   params=int(sum(x.size for x in jax.tree.leaves(params))))
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


PREEMPT_CHECK_EVERY = 10  # multi-process: steps between SIGTERM consensus checks


def _any_process(flag: bool, step: int) -> bool:
    """Whether any process got SIGTERM. Across processes this is an allgather, a sync point
    that stalls async dispatch, so it runs every PREEMPT_CHECK_EVERY steps (the same steps
    on every process, so all of them checkpoint at one step)."""
    import jax

    if jax.process_count() == 1:
        return flag
    if step % PREEMPT_CHECK_EVERY:
        return False
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _account(pending, bad_steps: int, allowed: int) -> tuple[dict, int]:
    """Fetch a finished step's metrics and check its loss; stop on NaN/Inf beyond the
    allowed number of skips. Returns (host metrics, bad steps so far)."""
    import jax

    step, metrics = pending
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
        bad_steps += 1
        if bad_steps > allowed:
            raise UserError(
                f"non-finite loss ({float(m['loss'])}) at step {step + 1}; the update was not "
                "applied and the last checkpoint is intact. Lower optim.lr, check the data, "
                "or allow skips with train.skip_nonfinite=N"
            )
        print(f"gpt2jax: warning: skipped step {step + 1} (non-finite loss)", file=sys.stderr)
    return m, bad_steps


def _update_best(best, metrics, step, key, mode):
    if not metrics or key not in metrics:
        return best
    v = float(metrics[key])
    if best is None or (v < best["value"] if mode == "min" else v > best["value"]):
        return {"step": step, "metric": key, "value": v}
    return best


def _initial_params(mcfg, seed, source_model, param_sh):
    import jax
    from flax import nnx

    from .checkpoint import flat_params
    from .model import create_model

    fresh = jax.jit(lambda: nnx.split(create_model(mcfg, seed))[1], out_shardings=param_sh)()
    if source_model is None:
        return fresh
    # Start from the source's weights; a new head (e.g. a classifier on a pretrained LM)
    # keeps its fresh initialisation.
    from .hf import to_flat_params

    src = to_flat_params(source_model)
    shard = flat_params(param_sh)
    leaves = []
    for path, var in nnx.to_flat_state(fresh):
        name = ".".join(map(str, path))
        if mcfg.scan_layers and path[0] == "h":
            import numpy as np

            rest = ".".join(map(str, path[1:]))
            host = np.stack([src[f"h.{i}.{rest}"] for i in range(mcfg.n_layer)])
        elif name in src:
            host = src[name]
            if name == "wte" and host.shape[0] < mcfg.vocab_size:  # added special tokens
                from .tasks import grow_embedding

                host = grow_embedding(host, mcfg.vocab_size)
        else:
            leaves.append((path, var))
            continue
        arr = jax.make_array_from_callback(host.shape, shard[name], lambda idx, h=host: h[idx])
        leaves.append((path, var.replace(arr)))
    return nnx.from_flat_state(leaves)


@dataclass
class StepPlan:
    """Everything a training step needs, built from the config alone (no data, no memory):
    the abstract parameters and optimizer state with their shardings, the optimizer, and
    the jitted train and eval steps. `gpt2jax train` runs it; `gpt2jax compile` lowers it
    for a device topology, so both see exactly the same step."""

    graphdef: Any
    abstract_params: Any  # nnx.State of jax.ShapeDtypeStruct
    abstract_opt: Any
    param_sh: Any
    opt_sh: Any
    tx: Any  # optax.GradientTransformation
    schedule: Callable[[int], Any]
    train_step: Callable  # (params, opt_state, batch, step) -> (params, opt_state, metrics)
    eval_step: Callable  # (params, batch) -> LM (nll sum, count) | class logits


def build_step(cfg: Config, mcfg: GPT2Config, mesh, total_steps: int, *,
               class_weights=None) -> StepPlan:
    """The sharded train and eval steps of `cfg` for model `mcfg` on `mesh`."""
    import jax
    from flax import nnx

    from .model import abstract_model
    from .optim import make_optimizer
    from .sharding import replicated, shardings_like_params, state_shardings

    t = cfg.train
    graphdef, abstract = nnx.split(abstract_model(mcfg))
    param_sh = state_shardings(abstract, mesh)
    tx, schedule = make_optimizer(cfg.optim, total_steps, abstract)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sh = shardings_like_params(abstract_opt, abstract, param_sh, replicated(mesh))
    classification = cfg.data.task == "classification"
    step = make_train_step(graphdef, tx, classification, t.grad_accum, jax.random.key(t.seed),
                           class_weights=class_weights, lm_loss_weight=t.lm_loss_weight)
    train_step = jax.jit(step, donate_argnums=(0, 1),
                         out_shardings=(param_sh, opt_sh, replicated(mesh)))
    eval_step = jax.jit(make_eval_step(graphdef, classification))
    return StepPlan(graphdef, abstract, abstract_opt, param_sh, opt_sh, tx, schedule,
                    train_step, eval_step)


def make_train_step(graphdef, tx, classification: bool, accum: int, base_key,
                    *, class_weights=None, lm_loss_weight: float = 0.0):
    """The pure train step (params, opt_state, batch, step) -> (params, opt_state, metrics).

    Batches carry a leading micro-batch axis of size `accum`. Losses are sums divided by
    the total token (or example) count, so accumulation equals the big-batch step exactly.
    A step whose loss or gradient is not finite leaves params and optimizer state unchanged.
    Classification: `class_weights` (num_labels,) weight each example's cross-entropy (the
    loss is the weighted mean); lm_loss_weight > 0 adds lambda * the mean LM loss over the
    real tokens (GPT-1's auxiliary objective), sharing one backbone pass. LM losses go
    through `GPT2.lm_loss_sum` (model.loss_chunk > 0: the fused chunked loss). When the
    batch lives on a multi-device mesh, the model's activation sharding constraints apply.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from .sharding import mesh_of

    def loss_sum(params, mb, key):
        model = nnx.merge(graphdef, params)
        if classification:
            ids, mask = mb["input_ids"], mb["attention_mask"]
            h, _ = model.hidden_states(ids, mask, dropout_key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(
                model.classify(h, mask, key), mb["labels"])
            w = jnp.ones_like(ce) if class_weights is None else \
                jnp.asarray(class_weights, jnp.float32)[mb["labels"]]
            total, count = (ce * w).sum(), w.sum()
            if lm_loss_weight:
                real = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
                lm = model.lm_loss_sum(h[:, :-1], ids[:, 1:], real) / jnp.maximum(
                    real.sum(), 1.0)
                total = total + lm_loss_weight * lm * count  # the step divides by count
            return total, count
        tokens, w = mb["tokens"], mb["weights"][:, 1:]
        h, _ = model.hidden_states(tokens[:, :-1], dropout_key=key)
        return model.lm_loss_sum(h, tokens[:, 1:], w), w.sum()  # model.loss_chunk: fused

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(params, opt_state, batch, step):
        with mesh_of(batch):  # activation sharding constraints when sharded
            return _step(params, opt_state, batch, step)

    def _step(params, opt_state, batch, step):
        key = jax.random.fold_in(base_key, step)
        if accum == 1:
            (loss, count), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), key)
        else:
            def micro(carry, xs):
                g_acc, l_acc, n_acc = carry
                mb, i = xs
                (loss_i, n), g = grad_fn(params, mb, jax.random.fold_in(key, i))
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss_i, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss, count), _ = jax.lax.scan(
                micro, (zeros, jnp.float32(0), jnp.float32(0)), (batch, jnp.arange(accum)))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = loss / count
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return keep(new_params, params), keep(new_opt, opt_state), {
            "loss": loss, "grad_norm": grad_norm, "count": count, "finite": ok}

    return step


def make_eval_step(graphdef, classification: bool):
    """Pure eval step: LM -> (nll sum, token count); classification -> logits."""
    import jax.numpy as jnp
    from flax import nnx

    from .sharding import mesh_of

    def step(params, batch):
        with mesh_of(batch):  # activation sharding constraints when sharded
            model = nnx.merge(graphdef, params)
            if classification:
                return model(batch["input_ids"], batch["attention_mask"])
            tokens, w = batch["tokens"], batch["weights"][:, 1:]
            h, _ = model.hidden_states(tokens[:, :-1])
            nll = model.token_nll(h, tokens[:, 1:])
            return jnp.stack([(nll * w).sum(), w.sum()])

    return step


def _prepare_data(cfg: Config, tokenizer, eos: int, labels: tuple[str, ...]):
    """batches.prepare, tokenizing once per run: in a multi-process run process 0 fills
    the tokenized-data cache first and the others then memory-map it (on a filesystem
    they do not share, each tokenizes for itself; the result is the same)."""
    import jax

    from .batches import prepare

    def go():
        return prepare(cfg.data, tokenizer, seq_len=cfg.train.seq_len, seed=cfg.train.seed,
                       eos=eos, labels=labels)

    if jax.process_count() == 1 or cfg.data.cache_dir == "off":
        return go()
    from .distributed import wait_for_peers

    prepared, failed = None, None
    if jax.process_index() == 0:
        try:
            prepared = go()
        except Exception as e:  # reach the barrier anyway, or the others would wait forever
            failed = e
    limit = cfg.dist.data_timeout
    wait_for_peers("data-cache", limit,
                   f"process 0 to tokenize the data into the cache; raise dist.data_timeout "
                   f"(now {limit:g} s) or run `gpt2jax prepare` with the same config first")
    if failed is not None:
        raise failed
    return prepared if prepared is not None else go()  # bad data fails the same way here


def run_eval(eval_fn, params, source, t, mesh, classification: bool, labels, pad_id,
             max_len) -> dict:
    """Validation metrics over (up to t.eval_batches) batches of the validation source."""
    import jax
    import numpy as np

    from .batches import Batcher
    from .sharding import global_batch

    n = len(source)
    # Micro-batch size: what the train step holds in memory at once. A split smaller than
    # one batch wraps around (a few examples counted twice) rather than another shape.
    bs = t.batch_size // t.grad_accum
    b = Batcher(source, bs, seed=t.seed + 1, process_index=jax.process_index(),
                process_count=jax.process_count(), pad_id=pad_id, max_len=max_len)
    steps = max(1, n // bs)
    if t.eval_batches:
        steps = min(steps, t.eval_batches)
    if classification:
        ys, preds = [], []
        for s in range(steps):
            local = b.batch(s)
            logits = eval_fn(params, global_batch(mesh, local))
            preds.append(np.asarray(_gather(logits)).argmax(-1))
            ys.append(b.global_indices(s))
        y_true = source.labels[np.concatenate(ys)]
        y_pred = np.concatenate(preds)
        from .evaluate import classification_metrics

        m = classification_metrics(y_true, y_pred, labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "examples": int(len(y_true)), "confusion_matrix": m["confusion_matrix"]}
    total = np.zeros(2)
    for s in range(steps):
        total += np.asarray(_gather(eval_fn(params, global_batch(mesh, b.batch(s)))))
    loss = total[0] / max(total[1], 1)
    return {"loss": float(loss), "perplexity": float(math.exp(min(loss, 50))),
            "tokens": int(total[1])}


def _gather(x):
    import jax

    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def write_samples(params, graphdef, tokenizer, t, step, tracker, run, main_process) -> None:
    """Greedy samples from the configured prompts to tensorboard and samples.jsonl."""
    from flax import nnx

    from .generate import generate

    model = nnx.merge(graphdef, params)
    results = generate(model, tokenizer, list(t.sample_prompts),
                       max_new_tokens=t.sample_max_new_tokens, greedy=True)
    if not main_process:
        return
    with (run / "samples.jsonl").open("a") as f:
        for r in results:
            row = {"step": step, "prompt": r.prompt, "completion": r.completion}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            tracker.text("samples", f"**{r.prompt}**{r.completion}", step)


class _Progress:
    def __init__(self, mode: str, total: int, start: int, enabled: bool):
        self.mode = "none" if not enabled else mode
        if self.mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr)
        self.total = total
        self.last = start

    def update(self, step: int, row: dict) -> None:
        if self.mode == "bar":
            self.bar.update(step - self.last)
            rate = row.get("tokens_per_sec") or row.get("examples_per_sec", 0)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", rate=f"{rate:,.0f}/s")
        elif self.mode == "lines":
            rate = (f"{row['tokens_per_sec']:,.0f} tok/s" if "tokens_per_sec" in row
                    else f"{row.get('examples_per_sec', 0):,.1f} ex/s")
            print(f"step {step}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                  f"grad_norm {row['grad_norm']:.3f} {rate}", file=sys.stderr, flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
