"""Device mesh and the logical-axis rule table: the whole sharding story in one place.

Parameters carry logical axis names (model.py); RULES maps each name to a mesh axis.
fsdp shards weights along `embed`, tensor splits heads, the MLP and the vocabulary,
and the batch is split over data x fsdp. A dimension that does not divide evenly by
its mesh axis is replicated instead (e.g. GPT-2's 50257-token vocabulary).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import UserError

AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("positions", None),
    ("norm", None),
    ("labels", None),
    ("layers", None),
    ("lora", None),  # LoRA's rank axis (small): adapters shard along their other axis
)


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 ("the rest") and check the product equals the device count."""
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(f"mesh: {n_devices} devices cannot be split with fixed sizes "
                            f"data={data} fsdp={fsdp} tensor={tensor}; pick sizes that divide "
                            f"{n_devices}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(f"mesh: data x fsdp x tensor = {sizes[0]} x {sizes[1]} x {sizes[2]} = "
                        f"{math.prod(sizes)}, but there are {n_devices} devices; set one of "
                        "mesh.data/fsdp/tensor to -1 to fill the rest")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (the compiler propagates shardings)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             rules=RULES) -> P:
    """PartitionSpec for an array with logical `axes`, replicating uneven dimensions."""
    table = dict(rules)
    if len(axes) + 1 == len(shape):  # scan-stacked layers carry a leading layer axis
        axes = ("layers", *axes)
    out, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule in sharding.RULES")
        names = tuple(n for n in _names(table.get(name)) if n not in used and mesh.shape[n] > 1)
        if names and dim % math.prod(mesh.shape[n] for n in names) == 0:
            out.append(names[0] if len(names) == 1 else names)
            used.update(names)
        else:
            out.append(None)
    return P(*out)


def _names(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A rule's or a PartitionSpec entry's mesh axes as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def state_shardings(state, mesh: Mesh, rules=RULES):
    """NamedShardings for an nnx.State of annotated Variables (same tree structure)."""
    from flax import nnx

    leaves = []
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.get_value().shape)
        axes = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
        spec = spec_for(axes, shape, mesh, rules)
        leaves.append((path, var.replace(NamedSharding(mesh, spec))))
    return nnx.from_flat_state(leaves)


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Batch arrays split over data x fsdp along axis `leading` (after any accum axis)."""
    spec = [None] * ndim
    spec[leading] = ("data", "fsdp")
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], leading: int = 0) -> dict:
    """Assemble a global batch from this process's rows (each process passes its shard)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, leading), v)
            for k, v in local.items()}


def shardings_like_params(tree, params, param_shardings, default: NamedSharding):
    """Shardings for a tree that embeds parameter-shaped leaves (an optimizer state).

    A leaf whose key path ends with a parameter's key path, and whose shape matches that
    parameter, is sharded like it (Adam's mu and nu); everything else (step counts, masked
    nodes of frozen parameters) gets `default`.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    by_path = {tuple(path): (leaf.shape, s)
               for (path, leaf), s in zip(flat, jax.tree.leaves(param_shardings))}
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, leaf):
        for n in lengths:
            hit = by_path.get(tuple(path[-n:])) if len(path) >= n else None
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def under_mesh(fn, mesh: Mesh):
    """fn traced with `mesh` as the current abstract mesh, which the model's activation
    constraints and the loss's chunk size read (a one-device mesh constrains nothing)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


# ---------------------------------------------------------------- inside the model


def has_cudnn() -> bool:
    """Whether JAX sees an NVIDIA GPU (CUDA backend)."""
    return any(d.platform == "gpu" and "cuda" in str(d.client.platform_version).lower()
               for d in jax.devices())


# True while `gpt2jax compile` traces for a GPU topology that this process does not see
_CUDA_TARGET = contextvars.ContextVar("gpt2jax_cuda_target", default=False)


@contextlib.contextmanager
def cuda_target():
    """Trace for NVIDIA GPUs that JAX here does not see (deviceless compilation)."""
    token = _CUDA_TARGET.set(True)
    try:
        yield
    finally:
        _CUDA_TARGET.reset(token)


def require_cudnn() -> None:
    """UserError unless JAX sees an NVIDIA GPU (CUDA backend), naming the devices seen."""
    devices = jax.devices()
    if not has_cudnn() and not _CUDA_TARGET.get():
        seen = ", ".join(sorted({f"{d.platform} ({d.device_kind})" for d in devices}))
        raise UserError(
            f"model.attention=cudnn needs an NVIDIA GPU with the CUDA build of jax, but JAX "
            f"sees {len(devices)} device(s): {seen}; use model.attention=xla or explicit "
            "(or install jax[cuda12] on a GPU machine)"
        )


def _traced_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh being traced under (`under_mesh`), or None without one or with one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def chunk_positions(tokens: int, shape: tuple[int, ...]) -> int:
    """Sequence positions per LM-loss chunk so that each device holds about `tokens` rows
    of logits (0: no chunking), the batch axis split by the `batch` rule under a mesh."""
    if tokens <= 0:
        return 0
    batch, length = shape[0], shape[1]
    mesh = _traced_mesh()
    if mesh is not None:
        axes = _names(spec_for(("batch",), (batch,), mesh)[0])
        batch //= math.prod(mesh.shape[n] for n in axes)
    return min(max(1, tokens // max(batch, 1)), length)


def constrain_batch(x: jax.Array) -> jax.Array:
    """An activation's leading (batch) axis sharded by the `batch` rule under a mesh, other
    axes replicated. Without it the SPMD partitioner gave some activations (the position
    embeddings' gradient) other layouts than the batch's, then replicated them."""
    mesh = _traced_mesh()
    if mesh is None:
        return x
    spec = spec_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def unshard_embed(table: jax.Array, row_axis: str) -> jax.Array:
    """An embedding table gathered along `embed` under a mesh (its rows keep their rule): a
    lookup into a table split along `embed` gives activations split along `embed`, which
    the partitioner cannot turn into the batch layout without replicating them first."""
    mesh = _traced_mesh()
    if mesh is None:
        return table
    return jax.lax.with_sharding_constraint(table, spec_for((row_axis, None), table.shape, mesh))
