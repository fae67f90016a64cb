"""The Optax chain: AdamW with a weight-decay mask, schedules, clipping, freezing (one
mechanism for `optim.freeze` and `model.lora`: docs/architecture.md)."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import optax

from .errors import UserError
from .params import map_names


def decays(name: str, decay_embeddings: bool = False) -> bool:
    """Weight decay on matrices only: never biases or LayerNorm; embeddings by choice."""
    leaf = name.rsplit(".", 1)[-1]
    if name in ("wte", "wpe"):
        return decay_embeddings
    return leaf.endswith("kernel") or leaf == "query"


def make_schedule(
    lr: float, schedule: str, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup, then constant / linear / cosine to end_lr at total_steps.

    With w = min(warmup_steps, total_steps - 1), step s < w uses lr * (s + 1) / (w + 1)
    (from lr / (w + 1), not 0, so step 0 is not a no-op); steps s >= w follow the main schedule
    over the remaining total_steps - w steps (cosine: end_lr + (lr - end_lr) * (1 + cos(pi *
    (s - w) / (total_steps - w))) / 2). tests/test_parity_torch.py checks this formula.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "linear":
        main = optax.linear_schedule(lr, end_lr, decay_steps)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr)
    else:
        raise UserError(f"optim.schedule={schedule!r}: choose constant, linear or cosine")
    if warmup_steps == 0:
        return main
    warm = optax.linear_schedule(lr / (warmup_steps + 1), lr, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


def frozen_fn(optim, lora=None) -> Callable[[str], bool] | None:
    """Which parameters stay fixed (None: none do): those optim.freeze's regexes match,
    and with a model.lora section everything but the adapters, the classifier head and
    model.lora.train's groups (lora.trainable). The two combine: a parameter trains only
    if LoRA lets it and no optim.freeze pattern matches it."""
    patterns = [re.compile(p) for p in optim.freeze]
    if not patterns and lora is None:
        return None
    from .lora import trainable

    groups = None if lora is None else tuple(lora.train)
    return lambda n: any(p.search(n) for p in patterns) or (
        groups is not None and not trainable(n, groups))


def frozen_names(optim, lora, params) -> frozenset[str] | None:
    """The names of params (an nnx.State) that stay fixed (frozen_fn), None if none do."""
    from .params import flat

    frozen = frozen_fn(optim, lora)
    return None if frozen is None else frozenset(n for n in flat(params) if frozen(n))


def make_optimizer(optim, total_steps: int, params, lora=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) of an OptimSection and model.lora section for these params."""
    schedule = make_schedule(optim.lr, optim.schedule, optim.warmup_steps, total_steps,
                             optim.end_lr)
    mask = map_names(lambda n: decays(n, optim.decay_embeddings), params)
    clip = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    tx = optax.chain(*clip, optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                        weight_decay=optim.weight_decay, mask=mask))
    frozen = frozen_fn(optim, lora)
    if frozen is not None:
        labels = map_names(lambda n: "frozen" if frozen(n) else "train", params)
        if "train" not in jax.tree.leaves(labels):
            raise UserError(f"optim.freeze {list(optim.freeze)} freezes every parameter; "
                            "nothing would train")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def update_count(opt_state) -> int:
    """How many updates the optimizer has applied (skipped non-finite steps do not count)."""
    import numpy as np

    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        if path and getattr(path[-1], "name", None) == "count":
            # replicated; on several hosts only a local copy can be read
            return int(np.asarray(leaf.addressable_data(0)))
    raise ValueError("the optimizer state has no update count")
