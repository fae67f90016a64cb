"""The training loop: a pure, jitted, sharded step and the periodic actions around it
(docs/architecture.md). What a run is made of (directory, model config, tokenizer, first
parameters) is run.py's."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BEST_METRICS, Config, check_packing_attention
from .errors import Preempted, UserError
from .model import GPT2Config

PREEMPT_CHECK_EVERY = 10  # multi-process: steps between SIGTERM consensus checks


def _fault(kind: str, step: int) -> None:
    """Fault injection for the resume tests: GPT2JAX_FAULT=kill@step:N (or kill@save:N,
    term@step:N, int@step:N) sends this process that signal at that point."""
    spec = os.environ.get("GPT2JAX_FAULT", "")
    for action, sig in (("kill", signal.SIGKILL), ("term", signal.SIGTERM),
                        ("int", signal.SIGINT)):
        if spec == f"{action}@{kind}:{step}":
            os.kill(os.getpid(), sig)


def train(cfg: Config) -> dict:
    """Train (or resume) the run in cfg.train.run_dir. Returns a summary dict."""
    from . import distributed

    d = cfg.dist  # before any other JAX call
    # by name: dist also holds settings initialize does not take (data_timeout)
    distributed.initialize(
        coordinator=d.coordinator, num_processes=d.num_processes, process_id=d.process_id,
        timeout=d.timeout, local_device_count=d.local_device_count)

    import jax

    from .run import RunDir

    run = RunDir(cfg.train.run_dir)
    run.check_writable()
    if jax.process_index() == 0:
        run.lock()  # before anything is read or written: one training per run directory
    try:
        return _train(cfg, run)
    finally:
        run.unlock()


def _train(cfg: Config, run) -> dict:
    import jax

    from .batches import Batcher
    from .checkpoint import Checkpoints
    from .run import load_model, lora_fields, resolve_model_config, tokenizer_for
    from .sharding import data_parallel_size, make_mesh

    t_start = time.time()
    t = cfg.train
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    micro = t.batch_size // t.grad_accum
    if micro % data_parallel_size(mesh):
        raise UserError(f"train.batch_size={t.batch_size} / grad_accum={t.grad_accum} = {micro} "
                        f"sequences per micro-batch is not divisible by the data-parallel size "
                        f"mesh.data x mesh.fsdp = {data_parallel_size(mesh)}")
    fresh = not run.resume
    from_source = fresh and cfg.model.init != "scratch"
    source_model = load_model(cfg.model.init)[0] if from_source else None
    adapter = cfg.model.lora.adapter if cfg.model.lora else ""
    if adapter and fresh:  # a missing or unfitting adapter fails before data work
        from .lora import read_config

        read_config(adapter, lora_fields(cfg.model.lora))
    tokenizer = tokenizer_for(cfg)
    recorded = None if fresh else run.model_config()
    eos = tokenizer.eos_token_id
    prepared = _prepare_data(cfg, tokenizer, eos, recorded.labels if recorded else ())
    if t.early_stop.patience and prepared.validation is None:
        raise UserError("train.early_stop needs a validation split, and the data gave none: "
                        "set data.validation, or data.validation_fraction > 0")
    mcfg = resolve_model_config(cfg, source_model.cfg if source_model else None,
                                prepared.labels, len(tokenizer), recorded)
    check_packing_attention(cfg.data.packing, mcfg.attention, resolved=True)
    batcher = Batcher(prepared.train, t.batch_size, t.seed, jax.process_index(),
                      jax.process_count(), pad_id=eos, max_len=min(t.seq_len, mcfg.n_positions),
                      accum=t.grad_accum)
    total = t.steps or max(1, math.ceil(t.epochs * batcher.steps_per_epoch()))
    main_process = jax.process_index() == 0
    if cfg.optim.warmup_steps >= total and main_process:
        print(f"gpt2jax: warning: optim.warmup_steps={cfg.optim.warmup_steps} is not below the "
              f"run's {total} steps, so the learning rate never reaches optim.lr",
              file=sys.stderr)
    class_weights = None
    if cfg.data.task == "classification" and t.class_weights == "balanced":
        from .tasks import balanced_class_weights

        class_weights = balanced_class_weights(prepared.train.labels, len(prepared.labels))
    plan = build_step(cfg, mcfg, mesh, total, class_weights=class_weights)
    ckpts = Checkpoints(run.path, t.keep_checkpoints)
    try:
        state = _start_state(ckpts, plan, mcfg, t.seed, source_model, adapter)
    except BaseException:
        ckpts.close()  # its background threads would outlive a refused resume
        raise
    source_model = None  # its host copy of the weights is no longer needed
    if main_process:  # only now: a failed restore leaves the run's files as they were
        run.write(cfg, mcfg, tokenizer)
        if state[0]:
            print(f"gpt2jax: resuming {run.path} from step {state[0]}", file=sys.stderr)
    loop = _Loop(cfg, plan, mesh, ckpts, prepared, tokenizer, total, state)
    try:
        loop.run(batcher)
    finally:
        loop.close()
    if main_process:
        _plots(run.path, loop.last_eval, prepared.labels)
    return {"run_dir": str(run.path), "start_step": loop.start, "total_steps": total,
            "processes": jax.process_count(), "mesh": dict(mesh.shape),
            "final_step": loop.step, "train_loss": loop.last_loss, "validation": loop.last_eval,
            "best": loop.watch.best, "stopped": loop.watch.stop_record(loop.step < total),
            "data": prepared.stats, "wall_seconds": round(time.time() - t_start, 1),
            "params": int(sum(x.size for x in jax.tree.leaves(loop.params)))}


def _start_state(ckpts, plan: StepPlan, mcfg: GPT2Config, seed: int, source_model,
                 adapter: str = "") -> tuple:
    """(start step, params, opt_state, meta) of the newest checkpoint that restores (straight
    into the target shardings), else the initial parameters and a fresh optimizer state."""
    import jax

    from .run import initial_params

    start, got = ckpts.restore_latest_good(plan.abstract_params, plan.abstract_opt,
                                           plan.param_sh, plan.opt_sh)
    if start is not None:
        return (start, *got)
    params = initial_params(mcfg, seed, source_model, plan.param_sh, adapter)
    return 0, params, jax.jit(plan.tx.init, out_shardings=plan.opt_sh)(params), {}


class _Loop:
    """A run in progress: the step and the periodic actions around it, each every N steps;
    the last step's evaluation and checkpoint are `finish`'s."""

    def __init__(self, cfg: Config, plan: StepPlan, mesh, ckpts, prepared, tokenizer,
                 total: int, state: tuple):
        import jax

        from .tracking import Tracker

        self.t, self.plan, self.mesh, self.ckpts = cfg.train, plan, mesh, ckpts
        self.prepared, self.tokenizer, self.total = prepared, tokenizer, total
        self.start, self.params, self.opt_state, meta = state
        self.step = self.start
        main = jax.process_index() == 0
        self.classification = cfg.data.task == "classification"
        self.watch = Watch(self.t, self.classification, meta)
        self.saved_at = self.start  # the step of the newest checkpoint
        self.tracker = Tracker(ckpts.dir.parent, main, resume_step=self.start)
        self.tracker.log(self.start, prepared.stats, split="data")  # bytes_per_token, ...
        self.progress = _Progress(self.t.progress, total, self.start, main)
        self.last_loss = self.last_eval = None
        self.pending = None  # metrics of the step in flight, read one step late (async)
        self.bad_steps = 0
        self.window = (time.perf_counter(), 0.0, 0)  # start, data wait, steps
        self.stop_signal = None  # SIGTERM or SIGINT once one arrived
        main_thread = threading.current_thread() is threading.main_thread()
        self.old_handlers = {sig: signal.signal(sig, self._on_signal)
                             for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum  # checkpointed at the next step's preemption check
        if signum == signal.SIGINT:  # a second Ctrl-C aborts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def run(self, batcher) -> None:
        import jax.numpy as jnp

        from .sharding import global_batch

        t = self.t
        actions = [(t.log_every, self.log), (1, lambda done: _fault("step", done)),
                   (t.eval_every, self.evaluate),
                   (t.sample_every if t.sample_prompts else 0, self.sample),
                   (t.checkpoint_every, self.save), (1, self.check_preempted),
                   (t.eval_every if self.watch.patience else 0, self.keep_best)]
        # a resumed run that had stopped early (with this patience) takes no step
        end = self.start if self.watch.exhausted() else self.total
        for step, local, waited in batcher.iterate(self.start, end):
            shaped = {k: v.reshape(t.grad_accum, -1, *v.shape[1:]) for k, v in local.items()}
            batch = global_batch(self.mesh, shaped, leading=1)  # after the grad-accum axis
            self.params, self.opt_state, metrics = self.plan.train_step(
                self.params, self.opt_state, batch, jnp.int32(step))
            self._fetch()  # the previous step's metrics: this one is still running
            self.pending = (step, metrics)
            start, wait, steps = self.window
            self.window = (start, wait + waited, steps + 1)
            self.step = done = step + 1
            for every, action in actions if done < self.total else ():
                if every and done % every == 0:
                    action(done)
            if self.watch.exhausted():  # keep_best saved this step
                break
        self.finish()

    def finish(self) -> None:
        """The last step's log, samples, evaluation and checkpoint (a run stopped early
        ran them at its last step already, and logs why it stopped)."""
        t = self.t
        last = self.step = self.step if self.watch.exhausted() else self.total
        if t.log_every:
            self.log(last)
        self._fetch()
        if last == self.total:
            if t.sample_every and t.sample_prompts and last % t.sample_every == 0:
                self.sample(last)
            self.evaluate(last)
            self.save(last)
        if self.start < last < self.total:  # a resumed stopped run adds no second row
            self.tracker.log(last, self.watch.stop_record(True), split="stop")
        self.ckpts.close()

    def _fetch(self) -> dict | None:
        if self.pending is None:
            return None
        m, self.bad_steps = _account(self.pending, self.bad_steps, self.t.skip_nonfinite)
        self.last_loss, self.pending = float(m["loss"]), None
        return m

    def log(self, done: int) -> None:
        from .optim import update_count

        m = self._fetch()
        if m is None:
            return
        # the rate of the last applied update (skipped steps do not advance it)
        lr = float(self.plan.schedule(max(update_count(self.opt_state) - 1, 0)))
        row = _train_row(m, lr, self.window, self.t, self.classification)
        self.tracker.log(done, row)
        self.progress.update(done, row)
        self.window = (time.perf_counter(), 0.0, 0)

    def evaluate(self, done: int) -> None:
        if self.prepared.validation is None:
            return
        res = run_eval(self.plan, self.params, self.prepared, self.t, self.mesh,
                       self.tokenizer.eos_token_id)
        self.tracker.log(done, res, split="validation")
        self.last_eval = res
        self.watch.update(res, done)

    def keep_best(self, done: int) -> None:
        """With early stopping: checkpoint a new best evaluation and the step where
        patience ran out."""
        if self.watch.best_step() == done or self.watch.exhausted():
            self.save(done)

    def sample(self, done: int) -> None:
        write_samples(self.params, self.plan.graphdef, self.tokenizer, self.t, done, self.tracker)

    def save(self, done: int) -> None:
        """Checkpoint step `done` unless it is saved already (Orbax refuses a step twice)."""
        if self.saved_at == done:
            return
        meta = {"step": done, "data_position": done, "seed": self.t.seed, **self.watch.state(),
                "rng": f"fold_in(key({self.t.seed}), step)", "metrics": self.last_eval or {}}
        self.ckpts.save(done, self.params, self.opt_state, meta)
        self.saved_at = done
        _fault("save", done)

    def check_preempted(self, done: int) -> None:
        if not _any_process(self.stop_signal is not None, done):
            return
        self.save(done)
        self.ckpts.close()
        raise Preempted(done, self.ckpts.dir / str(done), self.stop_signal or signal.SIGTERM)

    def close(self) -> None:
        self.progress.close()
        self.tracker.close()
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        with contextlib.suppress(Exception):
            self.ckpts.close()


def _train_row(m: dict, lr: float, window: tuple, t, classification: bool) -> dict:
    """metrics.jsonl's row of a log step: the step's metrics and the rates since the
    last log (window: start time, seconds waited for data, steps)."""
    start, wait, steps = window
    dt = time.perf_counter() - start
    row = {"loss": float(m["loss"]), "lr": lr, "grad_norm": float(m["grad_norm"]),
           "steps_per_sec": steps / dt, "data_wait_fraction": wait / dt}
    rate, per = ("examples_per_sec", 1) if classification else ("tokens_per_sec", t.seq_len)
    row[rate] = steps * t.batch_size * per / dt
    return row


def _account(pending, bad_steps: int, allowed: int) -> tuple[dict, int]:
    """A finished step's (host metrics, bad steps so far); UserError on a non-finite loss
    beyond the allowed number of skips."""
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


def _plots(run_dir: Path, last_eval: dict | None, labels) -> None:
    """The loss curve and, for a classifier, the last evaluation's confusion matrix."""
    from .tracking import plot_loss

    plot_loss(run_dir)
    if last_eval and "confusion_matrix" in last_eval:
        from .evaluate import plot_confusion_matrix

        plot_confusion_matrix(last_eval["confusion_matrix"], labels,
                              run_dir / "confusion_matrix.png")


def _any_process(flag: bool, step: int) -> bool:
    """Whether any process got a stop signal: an allgather (a sync point that stalls async
    dispatch), so only every PREEMPT_CHECK_EVERY steps, the same steps on every process."""
    import jax

    if jax.process_count() == 1:
        return flag
    if step % PREEMPT_CHECK_EVERY:
        return False
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class Watch:
    """The best value of train.best_metric so far and the early-stopping count
    (docs/architecture.md)."""

    def __init__(self, t, classification: bool, meta: dict):
        self.key = t.best_metric or ("accuracy" if classification else "loss")
        self.sign = -1.0 if self.key in BEST_METRICS["classification"] else 1.0  # higher: better
        self.patience, self.min_delta = t.early_stop.patience, t.early_stop.min_delta
        same = (meta.get("best") or {}).get("metric") == self.key  # else best_metric changed
        self.best = meta.get("best") if same else None
        es = (meta.get("early_stop") if same else None) or {}
        self.reference, self.waited = es.get("reference"), es.get("waited", 0)

    def _beats(self, value: float, other: float | None, margin: float) -> bool:
        return other is None or self.sign * (other - value) > margin

    def update(self, metrics: dict, step: int) -> None:
        """Account for one evaluation's metrics at `step`."""
        if not metrics or self.key not in metrics:
            return
        v = float(metrics[self.key])
        if self._beats(v, self.best and self.best["value"], 0.0):
            self.best = {"step": step, "metric": self.key, "value": v}
        if self._beats(v, self.reference, self.min_delta):
            self.reference, self.waited = v, 0
        else:
            self.waited += 1

    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    def exhausted(self) -> bool:
        """Whether early stopping ends the run (patience 0: never)."""
        return 0 < self.patience <= self.waited

    def state(self) -> dict:
        """What a checkpoint records to resume from."""
        return {"best": self.best,
                "early_stop": {"reference": self.reference, "waited": self.waited}}

    def stop_record(self, early: bool) -> dict:
        """Why the run ended, `early` (before train.steps) or not: metrics.jsonl's "stop"
        row and the summary's "stopped"."""
        if not early:
            return {"reason": "steps"}
        return {"reason": "early_stop", "metric": self.key, "patience": self.patience,
                "min_delta": self.min_delta, "best_step": self.best_step(),
                "best_value": self.best and self.best["value"]}


@dataclass
class StepPlan:
    """Everything a training step needs, built from the config alone (no data, no memory).
    `gpt2jax train` runs it; `gpt2jax compile` lowers it, so both see the same step."""

    graphdef: Any
    abstract_params: Any  # nnx.State of jax.ShapeDtypeStruct
    abstract_opt: Any
    param_sh: Any
    opt_sh: Any
    tx: Any  # optax.GradientTransformation
    schedule: Callable[[int], Any]
    train_step: Callable  # (params, opt_state, batch, step) -> (params, opt_state, metrics)
    eval_step: Callable  # (params, batch) -> LM (nll sum, count) | class logits
    mcfg: GPT2Config


def build_step(cfg: Config, mcfg: GPT2Config, mesh, total_steps: int, *,
               class_weights=None) -> StepPlan:
    """The sharded train and eval steps of `cfg` for model `mcfg` on `mesh`."""
    import jax
    from flax import nnx

    from .model import abstract_model
    from .optim import frozen_names, make_optimizer
    from .sharding import replicated, shardings_like_params, state_shardings

    t = cfg.train
    graphdef, abstract = nnx.split(abstract_model(mcfg))
    param_sh = state_shardings(abstract, mesh)
    tx, schedule = make_optimizer(cfg.optim, total_steps, abstract, cfg.model.lora)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sh = shardings_like_params(abstract_opt, abstract, param_sh, replicated(mesh))
    classification = cfg.data.task == "classification"
    step = make_train_step(graphdef, tx, classification, t.grad_accum, jax.random.key(t.seed),
                           class_weights=class_weights, lm_loss_weight=t.lm_loss_weight,
                           mesh=mesh, frozen=frozen_names(cfg.optim, cfg.model.lora, abstract))
    train_step = jax.jit(step, donate_argnums=(0, 1),
                         out_shardings=(param_sh, opt_sh, replicated(mesh)))
    eval_step = jax.jit(make_eval_step(graphdef, classification, mesh))
    return StepPlan(graphdef, abstract, abstract_opt, param_sh, opt_sh, tx, schedule,
                    train_step, eval_step, mcfg)


def _loss_weights(batch: dict, classification: bool, class_weights=None):
    """Per-example (classification) or per-target-token (LM) loss weights, and for the
    auxiliary LM loss the mask of real next-token pairs (None for LM)."""
    import jax.numpy as jnp

    if classification:
        mask = batch["attention_mask"]
        w = jnp.ones(batch["labels"].shape, jnp.float32) if class_weights is None else \
            jnp.asarray(class_weights, jnp.float32)[batch["labels"]]
        return w, (mask[..., 1:] * mask[..., :-1]).astype(jnp.float32)
    return batch["weights"][..., 1:], None


def make_train_step(graphdef, tx, classification: bool, accum: int, base_key,
                    *, class_weights=None, lm_loss_weight: float = 0.0, mesh=None,
                    frozen=None):
    """The pure train step (params, opt_state, batch, step) -> (params, opt_state, metrics);
    batches carry a leading micro-batch axis of size `accum` (docs/architecture.md)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from .sharding import under_mesh

    def loss_part(params, mb, w, real, key, denom):
        """This micro-batch's share of the step's loss: its sums over the step's counts."""
        model = nnx.merge(graphdef, _fix_frozen(params, frozen))
        if classification:
            ids, mask = mb["input_ids"], mb["attention_mask"]
            h, _ = model.hidden_states(ids, mask, dropout_key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(
                model.classify(h, mask, key), mb["labels"])
            loss = (ce * w).sum() / denom[0]
            if lm_loss_weight:
                lm = model.lm_loss_sum(h[:, :-1], ids[:, 1:], real)
                loss = loss + lm_loss_weight * lm / denom[1]
            return loss
        tokens = mb["tokens"]
        h, _ = model.hidden_states(tokens[:, :-1], dropout_key=key, segment_ids=_segments(mb))
        return model.lm_loss_sum(h, tokens[:, 1:], w) / denom[0]  # model.loss_chunk: fused

    grad_fn = jax.value_and_grad(loss_part)

    def step(params, opt_state, batch, step):
        key = jax.random.fold_in(base_key, step)
        w, real = _loss_weights(batch, classification, class_weights)  # all micro-batches
        count = jnp.maximum(w.sum(), 1.0)
        denom = (count, jnp.maximum(real.sum(), 1.0) if real is not None else None)
        if accum == 1:
            loss, grads = grad_fn(params, *jax.tree.map(lambda x: x[0], (batch, w, real)),
                                  key, denom)
        else:
            def micro(carry, xs):
                *mb, i = xs
                loss_i, g = grad_fn(params, *mb, jax.random.fold_in(key, i), denom)
                return jax.tree.map(jnp.add, carry, (g, loss_i)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss), _ = jax.lax.scan(
                micro, (zeros, jnp.float32(0)), (batch, w, real, jnp.arange(accum)))
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = _fix_frozen(optax.apply_updates(params, updates), frozen, params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return keep(new_params, params), keep(new_opt, opt_state), {
            "loss": loss, "grad_norm": grad_norm, "count": count, "finite": ok}

    return step if mesh is None else under_mesh(step, mesh)


def _fix_frozen(new, frozen, old=None):
    """`new` with its `frozen` parameters stopped (old None: no gradient flows into them)
    or taken from `old` (their exact bits, whatever an update held)."""
    if not frozen:
        return new
    import jax

    from .params import path_name

    def one(path, a, *b):
        if path_name(path) not in frozen:
            return a
        return b[0] if b else jax.lax.stop_gradient(a)

    return jax.tree_util.tree_map_with_path(one, new, *(() if old is None else (old,)))


def make_eval_step(graphdef, classification: bool, mesh=None):
    """Pure eval step: LM -> (nll sum, token count); classification -> logits. With a
    `mesh`, it traces under it (the model's activation sharding constraints)."""
    import jax.numpy as jnp
    from flax import nnx

    from .sharding import under_mesh

    def step(params, batch):
        model = nnx.merge(graphdef, params)
        if classification:
            return model(batch["input_ids"], batch["attention_mask"])
        tokens, w = batch["tokens"], batch["weights"][:, 1:]
        h, _ = model.hidden_states(tokens[:, :-1], segment_ids=_segments(batch))
        nll = model.token_nll(h, tokens[:, 1:])
        return jnp.stack([(nll * w).sum(), w.sum()])

    return step if mesh is None else under_mesh(step, mesh)


def _segments(batch: dict):
    """The inputs' segment ids of an LM batch packed by document, else None (the next
    document's leading EOS stays the target of a document's last input: where it ends)."""
    seg = batch.get("segments")
    return None if seg is None else seg[:, :-1]


def _prepare_data(cfg: Config, tokenizer, eos: int, labels: tuple[str, ...]):
    """batches.prepare, tokenizing once per run: process 0 fills the data cache first, and
    the other processes then read it (or, without a shared filesystem, tokenize too)."""
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


def run_eval(plan: StepPlan, params, prepared, t, mesh, pad_id: int) -> dict:
    """Validation metrics over (up to t.eval_batches) batches of prepared.validation."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from .batches import Batcher
    from .sharding import global_batch

    # Micro-batch size: what the train step holds in memory at once. A split smaller than
    # one batch wraps around (a few examples counted twice) rather than another shape.
    source, bs = prepared.validation, t.batch_size // t.grad_accum
    b = Batcher(source, bs, seed=t.seed + 1, process_index=jax.process_index(),
                process_count=jax.process_count(), pad_id=pad_id,
                max_len=min(t.seq_len, plan.mcfg.n_positions))
    steps = max(1, len(source) // bs)
    if t.eval_batches:
        steps = min(steps, t.eval_batches)
    gather = (lambda x: x) if jax.process_count() == 1 else \
        functools.partial(multihost_utils.process_allgather, tiled=True)
    outs = [np.asarray(gather(plan.eval_step(params, global_batch(mesh, b.batch(s)))))
            for s in range(steps)]
    if plan.mcfg.head != "lm":
        from .evaluate import classification_metrics

        y_true = source.labels[np.concatenate([b.global_indices(s) for s in range(steps)])]
        m = classification_metrics(y_true, np.concatenate([o.argmax(-1) for o in outs]),
                                   prepared.labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "examples": int(len(y_true)), "confusion_matrix": m["confusion_matrix"]}
    total = sum((o.astype(np.float64) for o in outs), np.zeros(2))
    loss = total[0] / max(total[1], 1)
    return {"loss": float(loss), "perplexity": float(math.exp(min(loss, 50))),
            "tokens": int(total[1])}


def write_samples(params, graphdef, tokenizer, t, step, tracker) -> None:
    """Greedy samples from the configured prompts to TensorBoard and the tracker's run's
    samples.jsonl (when the tracker writes: process 0)."""
    from flax import nnx

    from .generate import generate

    model = nnx.merge(graphdef, params)
    results = generate(model, tokenizer, list(t.sample_prompts),
                       max_new_tokens=t.sample_max_new_tokens, greedy=True)
    if not tracker.enabled:
        return
    with (tracker.run_dir / "samples.jsonl").open("a") as f:
        for r in results:
            row = {"step": step, "prompt": r.prompt, "completion": r.completion}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            tracker.text("samples", f"**{r.prompt}**{r.completion}", step)


class _Progress:
    """Progress on stderr from process 0: a tqdm bar, a line per log step, or nothing."""

    def __init__(self, mode: str, total: int, start: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.last = mode if enabled else "none", total, start
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr)

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
        if self.mode == "bar":
            self.bar.close()
