"""Orbax checkpoints of a run: params, optimizer state and metadata, saved asynchronously
as flat dicts {name: array}, restored by name (docs/architecture.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax

from . import params as P
from .errors import UserError


class StateMismatch(UserError):
    """The checkpoint holds other arrays than the run's state: settings changed."""


def _target(template, shardings) -> dict:
    """{name: ShapeDtypeStruct} of a state template on `shardings` (None: the template's
    own, else the first device)."""
    shards = P.flat(shardings) if shardings is not None else {}
    out = {}
    for k, v in P.flat(template).items():
        sharding = shards.get(k) or getattr(v, "sharding", None) or \
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
    return out


def _restore_target(item: str, target: dict, metadata) -> dict:
    """The target in the layer layout of the checkpoint's item (its Orbax metadata);
    StateMismatch if the names differ."""
    saved = set(getattr(metadata, "tree", metadata) or {})
    if saved and P.is_stacked(saved) != P.is_stacked(target):
        target = P.relayout_abstract(target, P.layer_count(target))
    if set(target) != saved:
        missing, extra = sorted(set(target) - saved), sorted(saved - set(target))
        hint = ("the optimizer settings changed (e.g. optim.freeze): restore them, or start "
                "a new train.run_dir from these weights with --model.init=RUN_DIR"
                if item == "opt_state" else "the model settings changed")
        raise StateMismatch(
            f"the checkpoint's {item} does not match this run ({len(missing)} arrays not in "
            f"the checkpoint, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}); "
            + hint)
    return target


def _from_saved(template, restored: dict, want: dict):
    """Fill `template` from restored arrays, converting the layer layout to `want`'s (the
    template's abstract arrays with their target shardings) if needed."""
    import jax.numpy as jnp

    values = P.relayout(restored, P.layer_count(want), P.is_stacked(want), stack_fn=jnp.stack)
    if values is not restored:  # converted on device: put each array where the run wants it
        values = {k: jax.device_put(v, want[k].sharding) for k, v in values.items()}
    return P.unflat(template, values)


class Checkpoints:
    """A run's checkpoint directory: save/restore, keep the last K plus the best."""

    def __init__(self, run_dir: str | Path, keep: int = 3, *, read_only: bool = False):
        import orbax.checkpoint as ocp

        self.dir = (Path(run_dir) / "checkpoints").absolute()
        self.keep, self.read_only = keep, read_only
        if read_only and not self.dir.is_dir():
            raise UserError(f"{run_dir} has no checkpoints/ directory")
        # handlers named up front, so item_metadata can list a step's arrays before restore
        self.mngr = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None, create=not read_only, enable_async_checkpointing=True),
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "opt_state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest(self) -> int | None:
        return max(self.mngr.all_steps(), default=None)

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

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Start an asynchronous save; older steps beyond keep (except the best) are removed."""
        import orbax.checkpoint as ocp

        self.mngr.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(P.flat(params)),
            opt_state=ocp.args.StandardSave(P.flat(opt_state)), meta=ocp.args.JsonSave(meta)))
        best = (meta.get("best") or {}).get("step")
        committed = [s for s in self.steps() if s != step]
        keep = set(committed[-(self.keep - 1):]) if self.keep > 1 else set()
        for s in committed:
            if s not in keep and s != best:
                self.mngr.delete(s)

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    def restore(self, step: int, params_template, opt_template=None, shardings=None,
                opt_shardings=None):
        """(params, opt_state or None, meta) restored onto the templates' shardings."""
        import orbax.checkpoint as ocp

        templates = {"params": (params_template, shardings)}
        if opt_template is not None:
            templates["opt_state"] = (opt_template, opt_shardings)
        wants = {name: _target(*t) for name, t in templates.items()}
        saved = self.mngr.item_metadata(step)
        items = {name: ocp.args.StandardRestore(_restore_target(name, want, saved[name]))
                 for name, want in wants.items()}
        out = self.mngr.restore(step, args=ocp.args.Composite(
            **items, meta=ocp.args.JsonRestore()))
        got = {name: _from_saved(templates[name][0], out[name], want)
               for name, want in wants.items()}
        return got["params"], got.get("opt_state"), dict(out["meta"])

    def restore_latest_good(self, params_template, opt_template=None, shardings=None,
                            opt_shardings=None):
        """(step, restore's triple) of the newest step that reads back, (None, None) if none
        exists. Unreadable newer steps are warned about and renamed to `<step>.unreadable`,
        so the run can save them again; when no step restores, a UserError explains."""
        steps = self.steps()
        failed: list[tuple[int, Exception]] = []
        for step in reversed(steps):
            try:
                got = self.restore(step, params_template, opt_template, shardings, opt_shardings)
            except StateMismatch:
                raise  # settings, not damage: older steps hold the same arrays
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
        n, dst = 1, self.dir / f"{step}.unreadable"
        while dst.exists():
            n += 1
            dst = self.dir / f"{step}.unreadable{n}"
        (self.dir / str(step)).rename(dst)
        self.mngr.reload()
        return dst
