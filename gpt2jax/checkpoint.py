"""Orbax checkpoints of a run: params, optimizer state and metadata, saved asynchronously.

Layout: RUN/checkpoints/<step>/{params,opt_state,meta}. Params are stored as a flat dict
{dotted name: array} and the optimizer state as its list of leaves, so a checkpoint
restores onto any mesh (the target shardings decide) and the model can be read back
without the optimizer. Orbax commits a step by renaming its temporary directory, so a
kill mid-write never damages an older step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

from .errors import UserError


def flat_params(state) -> dict:
    """{dotted name: array} of an nnx.State."""
    from flax import nnx

    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def unflat_params(template, flat: dict):
    """Fill an nnx.State template with arrays from flat_params' dict."""
    from flax import nnx

    leaves = [(p, v.replace(flat[".".join(map(str, p))])) for p, v in nnx.to_flat_state(template)]
    return nnx.from_flat_state(leaves)


def _leaf_dict(tree) -> dict:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _abstract(x, sharding=None):
    if sharding is None:
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class Checkpoints:
    """A run's checkpoint directory: save/restore, keep the last K plus the best."""

    def __init__(self, run_dir: str | Path, keep: int = 3, *,
                 read_only: bool = False):
        import orbax.checkpoint as ocp

        self.dir = (Path(run_dir) / "checkpoints").absolute()
        self.keep = keep
        self.read_only = read_only
        if read_only and not self.dir.is_dir():
            raise UserError(f"{run_dir} has no checkpoints/ directory")
        self.mngr = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None, create=not read_only, enable_async_checkpointing=True
            ),
        )

    # -- queries
    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def meta(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        out = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def best(self) -> int | None:
        """The step whose recorded eval metric is best (latest step's record of it)."""
        latest = self.latest()
        if latest is None:
            return None
        best = self.meta(latest).get("best")
        return best["step"] if best and best.get("step") in self.steps() else None

    # -- writing
    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Start an asynchronous save; older steps beyond keep (except the best) are removed."""
        import orbax.checkpoint as ocp

        self.mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(flat_params(params)),
                opt_state=ocp.args.StandardSave(_leaf_dict(opt_state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        best = (meta.get("best") or {}).get("step")
        committed = [s for s in self.steps() if s != step]
        keep = set(committed[-(self.keep - 1):]) if self.keep > 1 else set()
        for s in committed:
            if s not in keep and s != best:
                self.mngr.delete(s)

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    # -- reading
    def restore(self, step: int, params_template, opt_template=None, shardings=None,
                opt_shardings=None):
        """(params, opt_state or None, meta) restored onto the templates' shardings."""
        import orbax.checkpoint as ocp

        flat_t = flat_params(params_template)
        flat_s = flat_params(shardings) if shardings is not None else {}
        target = {k: _abstract(v, flat_s.get(k)) for k, v in flat_t.items()}
        items = {"params": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if opt_template is not None:
            leaves = jax.tree.leaves(opt_template)
            shard_leaves = jax.tree.leaves(opt_shardings) if opt_shardings is not None \
                else [None] * len(leaves)
            items["opt_state"] = ocp.args.StandardRestore(
                {f"{i:05d}": _abstract(x, s) for i, (x, s) in enumerate(zip(leaves, shard_leaves))}
            )
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        params = unflat_params(params_template, out["params"])
        opt = None
        if opt_template is not None:
            restored = out["opt_state"]
            opt = jax.tree.unflatten(jax.tree.structure(opt_template),
                                     [restored[f"{i:05d}"] for i in range(len(restored))])
        return params, opt, dict(out["meta"])

    def restore_latest_good(self, params_template, opt_template=None, shardings=None,
                            opt_shardings=None):
        """Restore the newest step that reads back; warn about each unreadable newer one.

        Unreadable newer steps are renamed to `<step>.unreadable` (kept for inspection) so
        that the resumed run can save those steps again. When no step restores, nothing is
        moved and a UserError explains (usually changed settings, not damage).
        """
        steps = self.steps()
        failed: list[tuple[int, Exception]] = []
        for step in reversed(steps):
            try:
                got = self.restore(step, params_template, opt_template, shardings, opt_shardings)
            except Exception as e:  # a corrupt or partial step: fall back to the previous
                failed.append((step, e))
                continue
            for bad, e in failed:
                moved = self._set_aside(bad)
                print(f"gpt2jax: warning: checkpoint {self.dir / str(bad)} is unreadable "
                      f"({type(e).__name__}); falling back to {self.dir / str(step)}"
                      + (f"; moved it to {moved}" if moved else ""), file=sys.stderr)
            return step, got
        if failed:
            step, e = failed[0]
            raise UserError(
                f"none of the checkpoints {steps} in {self.dir} can be restored (step {step}: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:300]}); if the model or "
                "optimizer settings changed (e.g. optim.freeze), use a new train.run_dir"
            ) from e
        return None, None

    def _set_aside(self, step: int) -> Path | None:
        """Rename an unreadable step directory out of Orbax's view (process 0 only)."""
        if self.read_only or jax.process_index() != 0:
            return None
        src = self.dir / str(step)
        dst = self.dir / f"{step}.unreadable"
        n = 1
        while dst.exists():
            n += 1
            dst = self.dir / f"{step}.unreadable{n}"
        src.rename(dst)
        self.mngr.reload()
        return dst


def load_run_model(run_dir: str | Path, step: int | str | None = None, **overrides):
    """(model, tokenizer) from a gpt2jax run directory: latest, a step, or "best"."""
    from flax import nnx

    from .config import read_run_config
    from .model import abstract_model
    from .tokenizer import load_tokenizer

    run = Path(run_dir)
    cfg = read_run_config(run)
    meta_path = run / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{run} has no model.json; it was not written by gpt2jax train")
    import json

    from .model import GPT2Config

    fields = json.loads(meta_path.read_text())
    fields["labels"] = tuple(fields.get("labels") or ())
    if fields.get("attention") == "cudnn" and "attention" not in overrides:
        from .model import has_cudnn

        if not has_cudnn():  # a run trained on GPUs, evaluated elsewhere: the same maths
            fields["attention"] = "explicit"
    mcfg = GPT2Config(**{**fields, **overrides})
    ckpts = Checkpoints(run, cfg.train.keep_checkpoints, read_only=True)
    if step is None or step == "latest":
        step = ckpts.latest()
        if step is None:
            raise UserError(f"{run} has no committed checkpoint yet")
    elif step == "best":
        step = ckpts.best()
        if step is None:
            raise UserError(f"{run} has no best checkpoint (no evaluation ran); use --step N")
    elif step not in ckpts.steps():
        raise UserError(f"{run} has no checkpoint at step {step}; it has {ckpts.steps()}")
    graphdef, template = nnx.split(abstract_model(mcfg))
    params, _, _ = ckpts.restore(int(step), template)
    ckpts.close()
    tok_dir = run / "tokenizer"
    return nnx.merge(graphdef, params), load_tokenizer(tok_dir if tok_dir.is_dir() else None)
