"""`gpt2jax compile`: compile the train and eval steps for a TPU or NVIDIA GPU topology, on
any machine.

libtpu's compiler (the `tpu` extra), or XLA's CUDA compiler from the CUDA plugin, gives
compile-only devices for a named topology (`jax.experimental.topologies.get_topology_desc`);
the step `gpt2jax train` would run is lowered with ShapeDtypeStruct arguments carrying
train's shardings (no memory, no data, nothing downloaded) and compiled into the real
executable. Its memory analysis says whether the step fits in HBM; its optimized HLO shows
the collectives a mesh choice costs.

TPU figures (CHIPS) are from the Cloud TPU documentation:
  v4   https://cloud.google.com/tpu/docs/v4
  v5e  https://cloud.google.com/tpu/docs/v5e
  v5p  https://cloud.google.com/tpu/docs/v5p
  v6e  https://cloud.google.com/tpu/docs/v6e
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UserError

GiB = 1024**3
INSTALL_HINT = "pip install 'gpt2jax[tpu]' (libtpu==0.0.42.*, the version jax[tpu]==0.10.2 pins)"
CUDA_HINT = ("pip install 'jax[cuda12]==0.10.2' (the CUDA plugin and NVIDIA's compiler "
             "wheels, about 3 GB; no GPU needed)")


def cpu_unless_tpu(environ=os.environ) -> None:
    """Set JAX_PLATFORMS=cpu when libtpu is installed but no TPU is attached, unless the
    user chose platforms or a GPU plugin is installed: JAX would otherwise start its TPU
    plugin (0.3-0.8 s more per process and five lines of warnings). No TPU: no PCI device
    of Google's vendor id, the check JAX's own Cloud TPU detection makes. `gpt2jax
    compile` is unaffected: get_topology_desc loads libtpu's compiler itself."""
    import glob
    import importlib.util
    from importlib.metadata import entry_points

    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return
    if importlib.util.find_spec("jax_plugins") or entry_points(group="jax_plugins"):
        return  # CUDA / ROCm plugins: leave the choice to JAX
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with contextlib.suppress(OSError):
            if Path(vendor).read_text().strip() == "0x1ae0":
                return
    environ["JAX_PLATFORMS"] = "cpu"


@dataclass(frozen=True)
class Gpu:
    """What XLA's CUDA compiler reads from an NVIDIA GPU besides the Chip figures."""

    name: str  # the device name JAX reports
    capability: tuple[int, int]
    sms: int
    clock_ghz: float
    l2_bytes: int
    smem_per_sm: int  # shared memory per SM; a block may opt in to 1 KiB less


@dataclass(frozen=True)
class Chip:
    """A TPU generation or an NVIDIA GPU: the per-chip figures of the roofline and how the
    compiler targets it (libtpu's topology naming, or a GPU's device description)."""

    family: str  # v4 | v5e | v5p | v6e | a100 | h100 | h200
    hbm_bytes: int
    peak_bf16: float  # FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bidirectional bytes/s per chip (NVLink on GPUs)
    topology_prefix: str = ""  # libtpu's topology name prefix ("v5" is v5p)
    megacore: bool = False  # two TensorCores per chip; accelerator names count TensorCores
    dims: int = 0  # torus dimensions
    gpu: Gpu | None = None


# NVIDIA's data sheets (SXM boards; dense bf16 tensor-core peak, HBM, NVLink bidirectional):
#   A100 80GB https://www.nvidia.com/en-us/data-center/a100/ (312 TFLOPs, 2039 GB/s, 600 GB/s)
#   H100 SXM  https://www.nvidia.com/en-us/data-center/h100/ (989 TFLOPs, 3.35 TB/s, 900 GB/s)
#   H200 SXM  https://www.nvidia.com/en-us/data-center/h200/ (989 TFLOPs, 4.8 TB/s, 900 GB/s)
# SMs, boost clock, L2 and shared memory per SM: NVIDIA's A100 and H100 architecture
# whitepapers (the H200 is an H100 with more and faster memory).
_H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 50 * 2**20, 228 * 1024)
CHIPS: dict[str, Chip] = {
    # 275 TFLOPs, 32 GiB, 1200 GBps; the page gives no per-chip ICI figure: 537 GB/s is its
    # "all-reduce bandwidth per Pod" 1.1 PB/s x 2 / 4096 chips, the relation the v5e and
    # v6e pages show between their all-reduce and per-chip bidirectional ICI figures.
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 2 * 1.1e15 / 4096, "v4", True, 3),
    # 197 TFLOPs, 16 GiB, 819 GBps, bidirectional ICI 400 GBps
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 400e9, "v5e", False, 2),
    # 459 TFLOPs, 95 GiB, 2765 GBps, bidirectional ICI 1200 GBps
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 1200e9, "v5", True, 3),
    # 918 TFLOPs, 32 GB, 1638 GBps, bidirectional ICI 800 GBps
    "v6e": Chip("v6e", 32 * 10**9, 918e12, 1638e9, 800e9, "v6e", False, 2),
    "a100": Chip("a100", 80 * GiB, 312e12, 2039e9, 600e9, gpu=Gpu(
        "NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 40 * 2**20, 164 * 1024)),
    "h100": Chip("h100", 80 * GiB, 989e12, 3350e9, 900e9, gpu=_H100),
    "h200": Chip("h200", 141 * 10**9, 989e12, 4800e9, 900e9,
                 gpu=replace(_H100, name="NVIDIA H200")),
}
GPUS_PER_HOST = 8  # HGX boards
# accelerator-type spellings (Cloud TPU's and common short forms) -> family
ALIASES = {"v4": "v4", "v5litepod": "v5e", "v5e": "v5e", "v5lite": "v5e", "v5p": "v5p",
           "v5": "v5p", "v6e": "v6e"}
# JAX's device_kind of each TPU generation (lower case) -> family
TPU_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p",
             "tpu v5": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def gpu_target_config(chip: Chip) -> str:
    """XLA's GpuTargetConfigProto as text: the device description the compiler would read
    from a real GPU. Thread and register limits are CUDA's for these capabilities (CUDA C++
    Programming Guide, "Technical Specifications")."""
    g = chip.gpu
    major, minor = g.capability
    return "\n".join([
        "gpu_device_info {",
        "  threads_per_block_limit: 1024", "  threads_per_warp: 32",
        "  shared_memory_per_block: 49152",
        f"  shared_memory_per_core: {g.smem_per_sm}",
        f"  shared_memory_per_block_optin: {g.smem_per_sm - 1024}",
        "  threads_per_core_limit: 2048", f"  core_count: {g.sms}",
        f"  fpus_per_core: {128 if major >= 9 else 64}",
        "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535",
        "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(chip.hbm_bw)}", f"  l2_cache_size: {g.l2_bytes}",
        f"  clock_rate_ghz: {g.clock_ghz}", f"  device_memory_size: {chip.hbm_bytes}",
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
        "}", 'platform_name: "CUDA"', "dnn_version_info { major: 9 minor: 8 }",
        f'device_description_str: "{g.name}"'])


@dataclass(frozen=True)
class Topology:
    """A parsed --topology: the chip, the compiler's name for the shape, the chip count."""

    name: str  # as the user wrote it
    chip: Chip
    libtpu_name: str  # e.g. "v5e:4x4"; a GPU's: XLA's "slices x hosts x GPUs per host"
    chips: int
    chips_per_host_bounds: tuple[int, int, int]
    slices: int = 1


def parse_gpu_topology(name: str, slices: int = 1) -> Topology | None:
    """`h100-8`, `a100-16`, `h200-1` (N GPUs, 8 per host) -> Topology; None when `name`
    names no GPU; UserError for a GPU name with an impossible count."""
    m = re.fullmatch(r"([a-z]\d+)-(\d+)", name)
    chip = CHIPS.get(m.group(1)) if m else None
    if chip is None or chip.gpu is None:
        return None
    count, per = int(m.group(2)), GPUS_PER_HOST
    if slices != 1:
        raise UserError(f"--slices is for TPU slices; for GPUs give the total count "
                        f"(--topology {m.group(1)}-{count * slices})")
    if count < 1 or (count > per and count % per):
        raise UserError(f"--topology {name!r}: N counts GPUs: up to {per} on one "
                        f"host, or a multiple of {per} (whole hosts)")
    hosts, per_host = max(count // per, 1), min(count, per)
    return Topology(name, chip, f"1x{hosts}x{per_host}", count, (per_host, 1, 1))


def _grid(chips: int, dims: int) -> list[int]:
    """The slice shape of a power-of-two chip count, as Cloud TPU lays them out:
    2D 4=2x2, 8=2x4, 16=4x4 ...; 3D 4=2x2x1, 8=2x2x2, 16=2x2x4, 32=2x4x4 ..."""
    shape = [1] * dims
    shape[0], shape[1] = (1, 1) if chips == 1 else (2, 2)
    while math.prod(shape) < chips:
        i = max(j for j, s in enumerate(shape) if s == min(shape))
        shape[i] *= 2
    return shape


def parse_topology(name: str, slices: int = 1) -> Topology:
    """A Cloud TPU accelerator type (v5litepod-16, v5e-16, v4-32, v5p-8, v6e-256), a raw
    libtpu name (v5e:4x4, v4:2x2x2, v5p:2x2x1) or an NVIDIA GPU count (h100-8:
    parse_gpu_topology) -> Topology. Unknown: UserError."""
    if slices < 1:
        raise UserError(f"--slices must be >= 1, got {slices}")
    gpu = parse_gpu_topology(name, slices)
    if gpu is not None:
        return gpu
    raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
    typed = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    family = ALIASES.get((raw or typed).group(1)) if (raw or typed) else None
    if family is None:
        known = ", ".join(f"{a}-N" for a in (*ALIASES, *(k for k, c in CHIPS.items() if c.gpu)))
        raise UserError(f"--topology {name!r} is not a known topology; known: {known}; "
                        "or FAMILY:AxB[xC] (e.g. v5e:4x4)")
    chip = CHIPS[family]
    example = f"{family}:{'x'.join(['2'] * chip.dims)}"
    if raw:
        shape = [int(x) for x in raw.group(2).split("x")]
        if len(shape) != chip.dims:
            raise UserError(f"--topology {name!r}: {family} slices have {chip.dims} "
                            f"dimensions, e.g. {example}")
        chips = math.prod(shape)
    else:
        count = int(typed.group(2))
        chips = count // 2 if chip.megacore else count
        smallest = 4 if chip.megacore else 1
        if chips < smallest or chips & (chips - 1) or (not chip.megacore and chips == 2):
            unit = "TensorCores (2 per chip)" if chip.megacore else "chips"
            first = smallest * (2 if chip.megacore else 1)
            raise UserError(f"--topology {name!r}: N counts {unit}; this command knows the "
                            f"power-of-two slices from {family}-{first}; for other shapes "
                            f"give the raw form, e.g. {example}")
        shape = _grid(chips, chip.dims)
    # Chips per host: v5e/v6e single hosts hold up to 8 chips (2x4), multi-host slices 4.
    if chips <= 8 and not chip.megacore:
        bounds = (shape[0], shape[1], 1)
    else:
        bounds = (min(shape[0], 2), min(shape[1], 2), 1)
    libtpu = f"{chip.topology_prefix}:{'x'.join(map(str, shape))}"
    return Topology(name, chip, libtpu, chips, bounds, slices)


def local_topology(devices: list) -> str | None:
    """The --topology name of these devices (this machine's: `jax.devices()`), e.g.
    `h100-8` or `v5e-4`; None for CPUs and accelerators this module has no figures for."""
    kind, n = devices[0].device_kind.lower(), len(devices)
    if devices[0].platform == "gpu":
        return next((f"{k}-{n}" for k, c in CHIPS.items() if c.gpu and k in kind), None)
    if devices[0].platform == "tpu":
        for prefix in sorted(TPU_KINDS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
            if kind.startswith(prefix):
                family = TPU_KINDS[prefix]
                return f"{family}-{2 * n if CHIPS[family].megacore else n}"
    return None


def cuda_plugin() -> str | None:
    """The installed JAX CUDA plugin's distribution name (jax-cuda12-plugin, or 13), or None."""
    import importlib.util

    return next((f"jax-cuda{v}-plugin" for v in (12, 13)
                 if importlib.util.find_spec(f"jax_cuda{v}_plugin")), None)


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of the topology: libtpu's compiler, or for a GPU topology XLA's
    CUDA compiler given the GPU's description (as JAX's tests/deviceless_aot_test.py does);
    no TPU or GPU needed."""
    from jax.experimental.topologies import get_topology_desc

    if topo.chip.gpu is not None:
        if cuda_plugin() is None:
            raise UserError(f"--topology {topo.name} needs XLA's CUDA compiler: {CUDA_HINT}")
        kw = dict(platform="cuda", target_config=gpu_target_config(topo.chip),
                  topology=topo.libtpu_name)
    else:
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise UserError(f"`gpt2jax compile` needs libtpu's compiler: {INSTALL_HINT}") \
                from None
        # libtpu takes /tmp/libtpu_lockfile to guard the chips; a compile-only client uses
        # none, and two compiles (or pytest workers) at once would otherwise refuse each other
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kw = dict(platform="tpu", topology_name=topo.libtpu_name,
                  chip_config_name="megacore" if topo.chip.megacore else "default",
                  chips_per_host_bounds=topo.chips_per_host_bounds)
        if topo.slices > 1:
            kw["num_slices"] = topo.slices
    try:
        return list(get_topology_desc(**kw).devices)
    except Exception as e:  # libtpu refuses the shape; a CUDA plugin that does not match jax
        why, shape = str(e).splitlines()[0], topo.libtpu_name
        raise UserError(f"--topology {topo.name}: " + (
            f"the CUDA plugin could not build {shape} ({why})" if topo.chip.gpu else
            f"libtpu cannot build {shape} ({why}); try another size or the raw form")) from e


# ---------------------------------------------------------------- the step, abstractly


def model_for_compile(cfg, platform: str = "tpu"):
    """The model config `gpt2jax train` would build, from the config alone: shapes from
    model.preset / the explicit dimensions (never from model.init: nothing is loaded),
    labels from data.labels or model.num_labels, automatic choices resolved for
    `platform` ("tpu", or "cuda" for a GPU topology)."""
    from .config import check_packing_attention
    from .model import PRESETS, resolve_auto
    from .run import model_config

    m = cfg.model
    if m.init != "scratch" and not m.preset:
        name = m.init.removeprefix("hf:")
        if name not in PRESETS:
            raise UserError(f"model.init={m.init}: `gpt2jax compile` loads no model, so it "
                            f"takes the shapes from model.preset; set --model.preset= one of "
                            f"{', '.join(PRESETS)} (or the model.n_* keys)")
        m.preset = name
    labels: tuple[str, ...] = tuple(cfg.data.labels)
    if cfg.data.task == "classification" and not labels and not m.num_labels:
        raise UserError("a classification config needs model.num_labels (or data.labels) "
                        "for `gpt2jax compile`, which reads no data")
    mcfg = model_config(cfg, None, labels)
    if cfg.data.add_special_tokens and m.vocab_size is None:  # as run.resolve_model_config
        from .tasks import with_special_tokens
        from .tokenizer import load_tokenizer

        needed = len(with_special_tokens(load_tokenizer(None), cfg.data.add_special_tokens))
        mcfg = mcfg.replace(vocab_size=max(mcfg.vocab_size, needed))
    # automatic choices (loss chunk, kernels, attention) as on the target, not this machine
    resolved = resolve_auto(mcfg, platform)
    check_packing_attention(cfg.data.packing, resolved.attention, resolved=True)
    return resolved


def abstract_batch(cfg, mcfg, mesh, *, train: bool = True) -> dict:
    """ShapeDtypeStructs of a global batch with the shardings `gpt2jax train` gives it:
    train batches carry the leading grad-accum axis, split over data x fsdp after it
    (sharding.global_batch(..., leading=1)); eval batches are one micro-batch. Classification
    rows take the longest bucket (min(seq_len, n_positions))."""
    import jax
    import jax.numpy as jnp

    from .sharding import batch_sharding, data_parallel_size

    t = cfg.train
    micro, dp = t.batch_size // t.grad_accum, data_parallel_size(mesh)
    if micro % dp:
        raise UserError(f"train.batch_size={t.batch_size} / grad_accum={t.grad_accum} = {micro} "
                        f"sequences per micro-batch is not divisible by the data-parallel size "
                        f"mesh.data x mesh.fsdp = {dp}")
    if cfg.data.task == "classification":
        length = min(t.seq_len, mcfg.n_positions)
        fields = {"input_ids": ((micro, length), jnp.int32),
                  "attention_mask": ((micro, length), jnp.int32),
                  "labels": ((micro,), jnp.int32)}
    else:
        fields = {"tokens": ((micro, t.seq_len + 1), jnp.int32),
                  "weights": ((micro, t.seq_len + 1), jnp.float32)}
        if cfg.data.packing == "documents":
            fields["segments"] = ((micro, t.seq_len + 1), jnp.int32)
    lead = (t.grad_accum,) if train else ()
    return {k: jax.ShapeDtypeStruct(lead + shape, dtype,
                                    sharding=batch_sharding(mesh, len(lead + shape), len(lead)))
            for k, (shape, dtype) in fields.items()}


def _with_shardings(tree, shardings):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def lowered_steps(cfg, mcfg, mesh) -> tuple:
    """(train step, eval step, their abstract arguments: params, opt_state and the train
    batch) of `gpt2jax train`, lowered for `mesh`'s devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from .sharding import replicated
    from .train import build_step

    class_weights = None
    if cfg.data.task == "classification" and cfg.train.class_weights == "balanced":
        class_weights = np.ones(mcfg.num_labels, np.float32)  # values do not change the step
    plan = build_step(cfg, mcfg, mesh, max(cfg.train.steps, 1), class_weights=class_weights)
    params = _with_shardings(plan.abstract_params, plan.param_sh)
    opt = _with_shardings(plan.abstract_opt, plan.opt_sh)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    batch = abstract_batch(cfg, mcfg, mesh)
    train = plan.train_step.lower(params, opt, batch, step)
    evaluate = plan.eval_step.lower(params, abstract_batch(cfg, mcfg, mesh, train=False))
    return train, evaluate, {"params": params, "opt_state": opt, "batch": batch}


# ---------------------------------------------------------------- reading the executable

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                     r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_CONST = re.compile(r"= s32\[\]\S* constant\((\d+)\)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _array_bytes(text: str) -> list[int]:
    return [_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
            for t, dims in _ARRAY.findall(text)]


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collectives of an optimized HLO module per step: {kind: {"count", "bytes"}}.

    An op inside a loop counts once per iteration: a while loop's trip count is its known
    trip count, else the one s32 constant its condition compares against (scans and
    fori loops count from 0), multiplied through nested loops and the computations that
    call it. Bytes are each op's result size per device (for an async start, its largest
    buffer: the gathered or permuted array)."""
    ops: dict[str, list[tuple[str, int]]] = {}
    edges: dict[str, list[tuple[str, str | int]]] = {}  # caller -> (callee, trips or cond)
    consts: dict[str, list[int]] = {}
    entry, comp = None, None
    for line in hlo.splitlines():
        head = _COMP.match(line)
        if head:
            comp = head.group(1)
            entry = comp if line.startswith("ENTRY") else entry
            continue
        if comp is None:
            continue
        op = _OP.match(line)
        if op:
            sizes = _array_bytes(op.group(1)) or [0]
            nbytes = sum(sizes) if not op.group(3) or op.group(2) == "all-reduce" else max(sizes)
            ops.setdefault(comp, []).append((op.group(2), nbytes))
        consts.setdefault(comp, []).extend(int(v) for v in _CONST.findall(line))
        called = dict(_CALLEE.findall(line))
        trips = _TRIPS.search(line)
        for role, names in called.items():
            n = (int(trips.group(1)) if trips else called.get("condition", 1)) \
                if role == "body" else 1
            for callee in names.strip("{}").replace("%", "").split(","):
                edges.setdefault(comp, []).append((callee.strip(), n))
    times: dict[str, int] = {}

    def visit(c: str, k: int) -> None:
        times[c] = times.get(c, 0) + k
        for callee, n in edges.get(c, ()):
            if isinstance(n, str):  # the loop's condition computation
                limits = consts.get(n.strip("{}").lstrip("%"), [])
                n = limits[0] if len(limits) == 1 else 1
            visit(callee, k * n)

    if entry is not None:
        visit(entry, 1)
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for c, k in times.items():
        for kind, nbytes in ops.get(c, ()):
            out[kind]["count"] += k
            out[kind]["bytes"] += k * nbytes
    return out


# ---------------------------------------------------------------- compile and report


def _nbytes_per_chip(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (no TPU padding)."""
    import jax

    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(tree))


def analytic_flops(cfg, mcfg) -> float:
    """Model FLOPs of one optimizer step (bench.flops_per_token times the step's tokens);
    a classification head replaces the LM head's vocab x n_embd matmul by its own."""
    from .bench import flops_per_token

    t = cfg.train
    if cfg.data.task == "classification":
        length = min(t.seq_len, mcfg.n_positions)
        per_token = flops_per_token(mcfg, length) - 6 * mcfg.vocab_size * mcfg.n_embd
        return float(t.batch_size * (length * per_token + 6 * mcfg.n_embd * mcfg.num_labels))
    return float(t.batch_size * t.seq_len * flops_per_token(mcfg, t.seq_len))


def _compile(lowered):
    """(executable or None, seconds, the compiler's memory message when it does not fit)."""
    import time

    t0 = time.perf_counter()
    try:
        return lowered.compile(), time.perf_counter() - t0, None
    except Exception as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        msg = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
        return None, time.perf_counter() - t0, msg


def _memory(exe, hbm: int) -> dict:
    """The compiler's memory analysis per chip, its total and the headroom left in HBM."""
    m = exe.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    # donated buffers (aliased) are an argument and an output at once: count them once
    out["total"] = sum(out.values()) - 2 * out["aliased"]
    return {**out, "headroom": hbm - out["total"]}


def roofline(chip: Chip, model_flops: float, hw_flops: float, hbm_bytes: float,
             coll: dict) -> dict:
    """A rough step-time estimate per chip, not a measurement: compute (the larger of the
    compiler's and the model's FLOPs at the bf16 peak), HBM traffic (XLA's "bytes accessed",
    which tends to overstate it) and ICI traffic (an all-reduce moves its bytes twice), each
    at the chip's rated speed and assumed to overlap: the longest is the estimate."""
    ici = sum(v["bytes"] * (2 if k == "all-reduce" else 1) for k, v in coll.items())
    times = {"compute": max(model_flops, hw_flops) / chip.peak_bf16,
             "hbm": hbm_bytes / chip.hbm_bw, "ici": ici / chip.ici_bw}
    step = max(times.values())
    return {"step_seconds": step, "bound": max(times, key=times.get),
            **{f"{k}_seconds": v for k, v in times.items()},
            "mfu": model_flops / (step * chip.peak_bf16) if step else 0.0}


def _advice(cfg, mcfg) -> str:
    """What to try when the step does not fit."""
    m, t, mesh = cfg.model, cfg.train, cfg.mesh
    tips = []
    if mesh.fsdp != -1:
        tips.append(f"more fsdp (mesh.fsdp={mesh.fsdp} -> {max(mesh.fsdp, 1) * 2}, "
                    "mesh.data=-1)")
    if m.remat != "full":
        tips.append(f"model.remat={'dots' if m.remat == 'none' else 'full'}")
    if t.batch_size // t.grad_accum > 1:
        tips.append(f"a smaller micro-batch (train.grad_accum={t.grad_accum * 2})")
    if mcfg.loss_chunk == 0 and cfg.data.task != "classification":
        tips.append("model.loss_chunk=4096")
    return "; ".join(tips)


def _step_report(exe, seconds: float, oom: str | None, chip: Chip, chips: int,
                 model_flops: float | None) -> dict:
    """A compiled step's memory and, given its model FLOPs, its cost and roofline."""
    if exe is None:
        return {"fits": False, "compile_seconds": round(seconds, 1), "compiler": oom}
    mem = _memory(exe, chip.hbm_bytes)
    out = {"fits": mem["headroom"] >= 0, "compile_seconds": round(seconds, 1), "memory": mem}
    if model_flops is None:
        return out
    cost = exe.cost_analysis() or {}
    hlo = exe.as_text()
    coll = collectives(hlo)
    hw, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    mine, loops = model_flops / chips, " while(" in hlo
    # XLA's cost analysis counts a loop body once (scanned layers, grad accumulation, the
    # chunked loss), so with loops its FLOPs and bytes undercount the step: the roofline
    # then scales the bytes by the FLOPs' shortfall against the model count
    scale = mine / hw if loops and 0 < hw < mine else 1.0
    # the CUDA compiler gives no cost analysis (None): without its bytes a roofline
    # would be compute-bound by construction, so there is none
    out.update(flops=hw, model_flops=mine, bytes_accessed=accessed, loops=loops,
               loop_scale=scale, collectives=coll, cost_analysis=bool(cost),
               roofline=roofline(chip, mine, hw, accessed * scale, coll) if cost else None)
    return out


def compile_config(cfg, topology: str, slices: int = 1, save: str | None = None, *,
                   evaluate: bool = True) -> dict:
    """Compile `gpt2jax train`'s train step (and eval step, unless `evaluate` is False)
    of `cfg` for a topology; report memory, FLOPs, collectives and a roofline estimate per
    chip (see the module doc)."""
    from .model import param_count
    from .sharding import cuda_target, make_mesh

    topo = parse_topology(topology, slices)
    mcfg = model_for_compile(cfg, "cuda" if topo.chip.gpu else "tpu")
    devices = topology_devices(topo)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    except ValueError as e:  # jax.make_mesh: "does not support multi-slice topologies"
        raise UserError(f"--slices {slices}: the mesh `gpt2jax train` builds "
                        f"(jax.make_mesh) spans one slice only ({e}); compile one slice, "
                        "--slices 1") from e
    with cuda_target() if topo.chip.gpu else contextlib.nullcontext():
        train_low, eval_low, args = lowered_steps(cfg, mcfg, mesh)
    chip, n = topo.chip, len(devices)
    train_exe, seconds, oom = _compile(train_low)
    train = _step_report(train_exe, seconds, oom, chip, n, analytic_flops(cfg, mcfg))
    ev = _step_report(*_compile(eval_low), chip, n, None) if evaluate else None
    result = {
        "topology": topo.name, "libtpu_topology": topo.libtpu_name, "slices": topo.slices,
        "chips": n, "chip": chip.family, "hbm_per_chip": chip.hbm_bytes,
        "mesh": dict(mesh.shape), "params": param_count(mcfg),
        "model": {k: getattr(mcfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size",
                                                "dtype", "remat", "scan_layers",
                                                "loss_chunk", "head", "attention",
                                                "kernels")},
        "batch": {k: getattr(cfg.train, k) for k in ("batch_size", "grad_accum", "seq_len")},
        "per_chip": {k: _nbytes_per_chip(v) for k, v in args.items()},
        "train": train, "eval": ev, "fits": train["fits"] and (ev is None or ev["fits"]),
    }
    if not result["fits"]:
        result["advice"] = _advice(cfg, mcfg)
    if save and result["fits"]:
        result["saved"] = str(save_executable(train_exe, topo, save))
    return result


def save_executable(exe, topo: Topology, path: str) -> Path:
    """Serialize the compiled train step with the versions that can load it (as MaxText's
    train_compile does): a pickle of {"executable", "in_tree", "out_tree", "versions"}."""
    import pickle
    from importlib.metadata import version

    import jax
    import jaxlib
    from jax.experimental.serialize_executable import serialize

    try:
        payload, in_tree, out_tree = serialize(exe)
    except (AttributeError, TypeError, pickle.PicklingError) as e:
        # e.g. cuDNN attention's custom partitioning holds a local function
        raise UserError(f"--save: JAX cannot serialize this executable ({e}); compile "
                        "without --save, or with model.attention=explicit") from e
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree,
                     "topology": topo.libtpu_name, "slices": topo.slices,
                     "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                                  **({cuda_plugin(): version(cuda_plugin())}
                                     if topo.chip.gpu else {"libtpu": version("libtpu")})}}, f)
    return out


def _mem(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB / 10 else f"{b / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    """The human-readable report of compile_config's result."""
    t, pc = r["train"], r["per_chip"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [f"{r['topology']} ({r['libtpu_topology']}, {r['chips']} chips, {r['chip']} "
             f"{_mem(r['hbm_per_chip'])} HBM each)  mesh {mesh}",
             f"model {r['params'] / 1e6:,.1f} M parameters  batch {r['batch']['batch_size']} x "
             f"{r['batch']['seq_len']} (grad_accum {r['batch']['grad_accum']}), kernels "
             f"{r['model']['kernels']}, attention {r['model']['attention']}",
             f"per chip: parameters {_mem(pc['params'])}, optimizer state "
             f"{_mem(pc['opt_state'])}, batch {_mem(pc['batch'])}"]
    for name, s in (("train step", t), ("eval step", r["eval"])):
        if s is None:
            continue
        if "memory" not in s:
            lines.append(f"{name}: DOES NOT FIT (compiled in {s['compile_seconds']} s): "
                         f"{s['compiler']}")
            continue
        m = s["memory"]
        verdict = (f"fits, {_mem(m['headroom'])} headroom" if s["fits"]
                   else f"DOES NOT FIT by {_mem(-m['headroom'])}")
        lines.append(f"{name}: {_mem(m['total'])} per chip (arguments "
                     f"{_mem(m['arguments'])}, temporaries {_mem(m['temporaries'])}, code "
                     f"{_mem(m['code'])}): {verdict}; compiled in {s['compile_seconds']} s")
    if "flops" in t:
        loops = " (loop bodies counted once)" if t["loops"] else ""
        xla = f"{t['flops']:.3g} (XLA){loops}" if t.get("cost_analysis", True) else \
            "none from XLA (its GPU compiler gives no cost analysis)"
        lines.append(f"FLOPs per chip per step: {xla}, "
                     f"{t['model_flops']:.3g} (model: 6N + attention)")
        lines.append("collectives per step: " + (", ".join(
            f"{k} {v['count']} ({v['bytes'] / 2**20:,.1f} MiB)"
            for k, v in t["collectives"].items() if v["count"]) or "none"))
        rf = t["roofline"]
        if rf is None:
            lines.append("roofline: none (the compiler reports no bytes accessed)")
        else:
            ms = {k: f"{rf[k + '_seconds'] * 1e3:.3g} ms"
                  for k in ("step", "compute", "hbm", "ici")}
            lines.append(f"roofline estimate (not a measurement): {ms['step']} per step, "
                         f"{rf['bound']}-bound (compute {ms['compute']}, HBM {ms['hbm']}, "
                         f"ICI {ms['ici']}), MFU {rf['mfu']:.0%}")
    if r.get("advice"):
        lines.append(f"to fit, try: {r['advice']}")
    if r.get("saved"):
        lines.append(f"saved the compiled train step to {r['saved']}")
    return "\n".join(lines)
