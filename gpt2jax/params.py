"""Parameter names, the flat {name: array} view of a tree, and the two layer layouts.

A leaf's name is its path in the tree joined by dots: "wte", "h.3.attn.c_attn_kernel",
"ln_f.scale" for parameters, and e.g. "inner_states.train.inner_state.1.0.mu.h.3.ln_1.scale"
inside an optimizer state. With `model.scan_layers` the blocks are one module whose arrays
carry a leading layer axis and whose names have no layer index ("h.attn.c_attn_kernel").
The per-layer names are canonical: the Hugging Face mapping and `optim.freeze` use them,
and `relayout` converts between the layouts (checkpoints restore into either one).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# a block name in either layout: the text before "h.", the layer index (per-layer only),
# and the rest. "h" is only ever the blocks' attribute, so the match is unambiguous.
_BLOCK = re.compile(r"^(?P<pre>(?:.*\.)?)h\.(?:(?P<index>\d+)\.)?(?P<rest>.+)$")


def key_name(key: Any) -> str:
    """One path entry (a jax key or an nnx path element) as text."""
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """The dotted name of a tree path, without the trailing `.value` of an nnx Variable."""
    parts = [key_name(k) for k in path]
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def flat(tree) -> dict[str, Any]:
    """{dotted name: leaf} of an nnx.State or any pytree (an optimizer state)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(path): leaf for path, leaf in leaves}


def unflat(template, values: dict[str, Any]):
    """The tree of `template` with each leaf taken from `values` by name."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [values[path_name(path)] for path, _ in leaves])


def map_names(fn: Callable[[str], Any], tree):
    """Tree of fn(name) over a parameter tree (optimizer masks and labels)."""
    return unflat(tree, {name: fn(name) for name in flat(tree)})


def is_stacked(names) -> bool:
    """Whether a set of names holds scan-stacked blocks (block names without an index)."""
    for name in names:
        m = _BLOCK.match(name)
        if m:
            return m["index"] is None
    return False


def unstack(values: dict[str, Any], n_layer: int,
            take: Callable[[Any, int], Any] = lambda v, i: v[i]) -> dict[str, Any]:
    """Stacked block entries (leading layer axis) split into per-layer entries
    (`take(v, i)`, default v[i], gives layer i)."""
    out = {}
    for name, v in values.items():
        m = _BLOCK.match(name)
        if m and m["index"] is None:
            for i in range(n_layer):
                out[f"{m['pre']}h.{i}.{m['rest']}"] = take(v, i)
        else:
            out[name] = v
    return out


def stack(values: dict[str, Any], n_layer: int,
          stack_fn: Callable[[list], Any] | None = None) -> dict[str, Any]:
    """Per-layer block entries joined along a new leading layer axis (`stack_fn`, default
    numpy's stack, receives the n_layer entries in order)."""
    stack_fn = stack_fn or np.stack
    out, blocks = {}, {}
    for name, v in values.items():
        m = _BLOCK.match(name)
        if m and m["index"] is not None:
            blocks.setdefault(f"{m['pre']}h.{m['rest']}", {})[int(m["index"])] = v
        else:
            out[name] = v
    for name, layers in blocks.items():
        if sorted(layers) != list(range(n_layer)):
            raise ValueError(f"{name}: layers {sorted(layers)}, expected 0..{n_layer - 1}")
        out[name] = stack_fn([layers[i] for i in range(n_layer)])
    return out


def relayout(values: dict[str, Any], n_layer: int, stacked: bool, *,
             stack_fn: Callable[[list], Any] | None = None) -> dict[str, Any]:
    """`values` in the layout asked for (stacked or per layer), whichever it is in."""
    if is_stacked(values) == stacked:
        return values
    return stack(values, n_layer, stack_fn) if stacked else unstack(values, n_layer)


def relayout_abstract(target: dict[str, jax.ShapeDtypeStruct], n_layer: int
                      ) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays (shape, dtype, NamedSharding) of `target` in the other layout: a
    stacked entry loses (a per-layer entry gains) the leading layer axis, which is never
    sharded (sharding.RULES: layers -> None)."""
    from jax.sharding import NamedSharding, PartitionSpec

    def one(x: jax.ShapeDtypeStruct, add: bool) -> jax.ShapeDtypeStruct:
        shape = (n_layer, *x.shape) if add else x.shape[1:]
        if not isinstance(x.sharding, NamedSharding):  # one device: nothing to move
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)
        spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
        spec = (None, *spec) if add else spec[1:]
        return jax.ShapeDtypeStruct(
            shape, x.dtype, sharding=NamedSharding(x.sharding.mesh, PartitionSpec(*spec)))

    if is_stacked(target):
        return unstack(target, n_layer, take=lambda x, _: one(x, add=False))
    return stack(target, n_layer, stack_fn=lambda xs: one(xs[0], add=True))


def layer_count(values: dict[str, Any]) -> int:
    """The number of blocks in `values`: the leading axis of a stacked entry, or the
    highest per-layer index + 1 (0 without blocks)."""
    for name, v in values.items():
        m = _BLOCK.match(name)
        if m:
            return v.shape[0] if m["index"] is None else 1 + max(
                int(b["index"]) for b in map(_BLOCK.match, values) if b and b["index"])
    return 0
