"""Multi-host start-up: find out which process this is and connect to the others.

`initialize` runs before any other JAX call and takes each setting from the first source
that has it: the config's `dist` section, GPT2JAX_* variables, SLURM inside `srun`, a TPU
VM (jax itself), else a single process (docs/scaling.md section 1, with the errors).
`python -m gpt2jax.distributed --selftest | --resolve` checks a cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .tracking import print_line

ENV_COORDINATOR = "GPT2JAX_COORDINATOR"
ENV_NUM_PROCESSES = "GPT2JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GPT2JAX_PROCESS_ID"
ENV_LOCAL_DEVICES = "GPT2JAX_LOCAL_DEVICES"
ENV_COORDINATOR_PORT = "GPT2JAX_COORDINATOR_PORT"  # SLURM: port on the first node

# Extra seconds jax's own initialization_timeout gets over ours, so that our watchdog
# (a clean error) fires first instead of jax's abort (SIGABRT and a C++ stack trace).
_JAX_TIMEOUT_MARGIN = 30


@dataclass(frozen=True)
class DistInfo:
    """Who this process is once the runtime is up."""

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    coordinator: str  # host:port, "" when single-process
    source: str = "single"  # where the settings came from: config, env, slurm, tpu, single


@dataclass(frozen=True)
class Plan:
    """What `initialize` will do, resolved from arguments and environment before connecting."""

    mode: str  # "single", "explicit" (coordinator/num/id known) or "tpu" (jax auto-detects)
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None  # None: every device the process sees
    source: str = "single"


# ---------------------------------------------------------------- pure helpers


def parse_coordinator(address: str, where: str = "dist.coordinator") -> tuple[str, int]:
    """Split 'host:port' (or '[v6addr]:port') and check both parts."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9_.\-]+):(\d+)", address.strip())
    if not m:
        raise UserError(f"{where}: {address!r} is not host:port (e.g. 10.0.0.2:8476 or "
                        "node001:8476)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise UserError(f"{where}: port {port} in {address!r} is outside 1..65535")
    return host, port


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('gpu[007-009,012],cpu1' -> 'gpu007'), no scontrol."""
    nodelist = nodelist.strip()
    # prefix, then the first number of a bracketed range, zero padding kept ('007-009')
    m = re.match(r"([^,\[]*)(?:\[(([^,\-\]]*)[^\]]*)\])?", nodelist)
    prefix, ranges, first = m.groups()
    if not (prefix or ranges):
        raise UserError(f"SLURM nodelist {nodelist!r} has no host name")
    return prefix + (first or "")


def _expand_counts(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts: '4(x2),3' -> [4, 4, 3]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = _expand_counts(env.get(key, ""))
        node = _int_env(env, "SLURM_NODEID") if len(set(counts)) > 1 else 0
        if node is not None and 0 <= node < len(counts):
            return counts[node]
    return _int_env(env, "SLURM_NTASKS_PER_NODE")


def slurm_local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """Which of the GPUs this SLURM task sees it should drive (None = all of them): all for
    one task on the node or one visible GPU, else GPU SLURM_LOCALID, not jax's always
    SLURM_LOCALID (docs/scaling.md, the one-GPU-per-node pitfall)."""
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return None  # the user's explicit choice; jax reads it itself
    gpus = next((env[k] for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                                  "HIP_VISIBLE_DEVICES") if k in env), None)
    one_gpu = gpus is not None and len([d for d in gpus.split(",") if d.strip()]) == 1
    if _slurm_tasks_on_node(env) == 1 or one_gpu:
        return None
    local = _int_env(env, "SLURM_LOCALID")
    return None if local is None else (local,)


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    # The variables srun sets for each task (the batch script itself has no SLURM_LOCALID
    # step context, so running `gpt2jax train` there without srun stays single-process).
    return all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID")) and bool(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    ) and bool(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))


def _slurm_port(env: Mapping[str, str]) -> int:
    if env.get(ENV_COORDINATOR_PORT):
        port = _int_env(env, ENV_COORDINATOR_PORT)
        if port is None or not 1 <= port <= 65535:
            raise UserError(f"{ENV_COORDINATOR_PORT}={env[ENV_COORDINATOR_PORT]!r} is not a port")
        return port
    # A port derived from the job id, so that two jobs sharing a node do not collide.
    return 20000 + int(env["SLURM_JOB_ID"]) % 20000


def on_tpu_vm(env: Mapping[str, str] | None = None) -> bool:
    """True on a Cloud TPU VM or in a GKE TPU pod (where jax finds its peers itself)."""
    env = os.environ if env is None else env
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
        return True
    has_chip = Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()
    return has_chip and importlib.util.find_spec("libtpu") is not None


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {key}={value!r} is not an integer") from None


def plan(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
         env: Mapping[str, str] | None = None, tpu: bool | None = None) -> Plan:
    """Resolve and validate the settings from the arguments, `env` (default os.environ)
    and, when `tpu` is None, a probe for TPU chips."""
    env = os.environ if env is None else env
    if num_processes < 0:
        raise UserError(f"dist.num_processes={num_processes}: use 0 (auto) or a count >= 1")
    if process_id < -1:
        raise UserError(f"dist.process_id={process_id}: use -1 (auto) or an id >= 0")
    coord, num, pid, sources = _settings(coordinator, num_processes, process_id, env)
    if not sources:
        if on_tpu_vm(env) if tpu is None else tpu:
            return Plan(mode="tpu", num_processes=0, process_id=-1, source="tpu")
        return Plan(mode="single")

    where = "; ".join(f"{k} from {v}" for k, v in sources.items())
    source = "+".join(sorted({v.split(" ")[0] for v in sources.values()}))
    if num is None:
        raise UserError(f"the number of processes is unknown ({where}); set "
                        f"dist.num_processes or {ENV_NUM_PROCESSES}")
    if pid is None and num > 1:
        raise UserError(f"this process's id is unknown ({where}); set dist.process_id or "
                        f"{ENV_PROCESS_ID} (0 .. {num - 1}) for each process")
    pid = pid or 0
    if not 0 <= pid < num:
        raise UserError(f"process id {pid} is out of range for {num} processes ({where}); "
                        f"ids go from 0 to {num - 1}")
    if num == 1:
        return Plan(mode="single", coordinator=coord, source=source)
    if not coord:
        raise UserError(f"{num} processes but no coordinator address ({where}); set "
                        f"dist.coordinator or {ENV_COORDINATOR} to host:port of process 0")
    parse_coordinator(coord, sources["coordinator"])
    ids = slurm_local_device_ids(env) if "slurm" in sources.get("process_id", "") else None
    return Plan(mode="explicit", coordinator=coord, num_processes=num, process_id=pid,
                local_device_ids=ids, source=source)


def _settings(coordinator: str, num_processes: int, process_id: int, env: Mapping[str, str]
              ) -> tuple[str, int | None, int | None, dict[str, str]]:
    """(coordinator, processes, process id, where each came from); each setting on its own."""
    slurm = _in_slurm_step(env)
    sources: dict[str, str] = {}
    coord = coordinator.strip()
    if coord:
        sources["coordinator"] = "config (dist.coordinator)"
    elif env.get(ENV_COORDINATOR, "").strip():
        coord, sources["coordinator"] = env[ENV_COORDINATOR].strip(), f"env {ENV_COORDINATOR}"
    elif slurm:
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        coord = f"{first_slurm_host(nodes)}:{_slurm_port(env)}"
        sources["coordinator"] = "slurm (first node of the step)"

    num: int | None = num_processes or None
    if num is not None:
        sources["num_processes"] = "config (dist.num_processes)"
    elif (n := _int_env(env, ENV_NUM_PROCESSES)) is not None:
        if n < 1:
            raise UserError(f"{ENV_NUM_PROCESSES}={n}: the number of processes must be >= 1")
        num, sources["num_processes"] = n, f"env {ENV_NUM_PROCESSES}"
    elif slurm:
        num = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
        sources["num_processes"] = "slurm (SLURM_NTASKS)"

    pid: int | None = process_id if process_id >= 0 else None
    if pid is not None:
        sources["process_id"] = "config (dist.process_id)"
    elif (i := _int_env(env, ENV_PROCESS_ID)) is not None:
        pid, sources["process_id"] = i, f"env {ENV_PROCESS_ID}"
    elif slurm:
        pid, sources["process_id"] = _int_env(env, "SLURM_PROCID"), "slurm (SLURM_PROCID)"
    return coord, num, pid, sources


# ---------------------------------------------------------------- connecting


def _check_port_free(port: int) -> None:
    """Process 0 binds the coordinator port; say so clearly when something else holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise UserError(f"this is process 0, the coordinator, but port {port} is taken "
                            f"({e.strerror}); pick another port in dist.coordinator / "
                            f"{ENV_COORDINATOR}") from None


def wait_for_coordinator(host: str, port: int, deadline: float, timeout: float) -> None:
    """Retry a TCP connection to the coordinator until it answers or `deadline` passes.

    Process 0 may start later, and in Kubernetes its DNS name appears only once its pod
    runs, so both name lookup and connection are retried.
    """
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"the coordinator {host}:{port} did not answer within dist.timeout="
                            f"{timeout:g} s ({last}); check that process 0 is running and "
                            "reachable at that address, or raise dist.timeout")
        try:
            with socket.create_connection((host, port), timeout=min(1.0, left)):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


@contextmanager
def _watchdog(seconds: float, message: str) -> Iterator[None]:
    """End the process with a clean error if the block is still running after `seconds`
    (jax.distributed.initialize blocks in C++, where no exception reaches, then aborts)."""
    def fire() -> None:
        print(f"gpt2jax: error: {message}", file=sys.stderr)
        _exit(2)

    timer = threading.Timer(max(seconds, 0.0), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               timeout: float = 60, local_device_count: int = 0) -> DistInfo:
    """Connect this process to the others (nothing for a single process), before any other
    JAX call. Arguments mirror the config's `dist` section ("" / 0 / -1: from the environment)."""
    if timeout <= 0:
        raise UserError(f"dist.timeout={timeout}: must be > 0 seconds")
    n_cpu = local_device_count or _int_env(os.environ, ENV_LOCAL_DEVICES) or 0
    if n_cpu < 0:
        raise UserError(f"dist.local_device_count={n_cpu}: use 0 (default) or a count >= 1")
    p = plan(coordinator, num_processes, process_id)  # validate before importing jax

    import jax
    from jax._src import xla_bridge  # no public API says whether backends exist yet

    if jax.distributed.is_initialized():
        return _info("existing")
    started = xla_bridge.backends_are_initialized()

    if n_cpu and not started:
        jax.config.update("jax_num_cpu_devices", n_cpu)
    elif n_cpu and jax.default_backend() == "cpu" and jax.local_device_count() != n_cpu:
        raise UserError(f"dist.local_device_count={n_cpu}, but JAX already runs with "
                        f"{jax.local_device_count()} devices; set it before anything uses "
                        "JAX (or use XLA_FLAGS=--xla_force_host_platform_device_count)")

    if p.mode == "single":
        return _info(p.source, p.coordinator)
    if started:
        raise RuntimeError("gpt2jax.distributed.initialize must run before any other JAX call "
                           "(jax.distributed cannot join processes once JAX's backends exist)")
    # CPU collectives across processes need gloo; GPU and TPU backends ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.monotonic() + timeout
    jax_timeout = math.ceil(timeout) + _JAX_TIMEOUT_MARGIN

    if p.mode == "tpu":
        kw: dict = {}
        message = (f"the TPU hosts did not all connect within dist.timeout={timeout:g} s; start "
                   "the same command on every worker (gcloud ... ssh --worker=all) or raise "
                   "dist.timeout")
    else:
        host, port = parse_coordinator(p.coordinator)
        if p.process_id == 0:
            _check_port_free(port)
        else:
            wait_for_coordinator(host, port, deadline, timeout)
        # Our plan already read SLURM; jax's detection would re-pick GPU = SLURM_LOCALID.
        kw = dict(coordinator_address=p.coordinator, num_processes=p.num_processes,
                  process_id=p.process_id, cluster_detection_method="deactivate",
                  local_device_ids=list(p.local_device_ids) if p.local_device_ids else None)
        message = (f"process {p.process_id} of {p.num_processes}: not all processes connected "
                   f"to the coordinator {p.coordinator} within dist.timeout={timeout:g} s; "
                   f"start all {p.num_processes} processes together (launch/local.sh, srun, a "
                   "k8s indexed Job), check dist.num_processes, or raise dist.timeout")
    with _watchdog(deadline - time.monotonic(), message):
        jax.distributed.initialize(initialization_timeout=jax_timeout, **kw)
    return _info(p.source)


def _info(source: str, coordinator: str | None = None) -> DistInfo:
    """This process's DistInfo; `coordinator` None: the one jax connected to (if any)."""
    import jax
    from jax._src import distributed as jax_distributed

    if coordinator is None:
        coordinator = jax_distributed.global_state.coordinator_address or ""
    return DistInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                    jax.device_count(), coordinator, source)


def leave_on_error(code: int) -> None:
    """In a multi-process run, end this process now with `code`, skipping JAX's atexit
    shutdown barrier, where peers waiting for this one would hold it (docs/scaling.md)."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        _exit(code)


def _exit(code: int) -> None:
    """Leave now, without atexit handlers, output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_barriers: dict[str, int] = {}


def wait_for_peers(name: str, timeout: float, waiting_for: str) -> None:
    """Block until every process has reached barrier `name`; a no-op for one process.

    The coordination service's barrier, not a device collective, so a long wait (process 0
    tokenizing) holds no accelerator. After `timeout` seconds: UserError naming `waiting_for`.
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client  # set by jax.distributed.initialize
    # a barrier id completes once; repeated waits get numbered ids (same order everywhere)
    n = _barriers[name] = _barriers.get(name, 0) + 1
    try:
        client.wait_at_barrier(f"gpt2jax-{name}-{n}", timeout_in_ms=max(1, int(timeout * 1000)))
    except Exception as e:  # jax's XlaRuntimeError: DEADLINE_EXCEEDED, or a peer went away
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"process {jax.process_index()} of {jax.process_count()}: waited "
                        f"{timeout:g} s for {waiting_for} ({reason})") from None


# ---------------------------------------------------------------- self-test


def selftest(info: DistInfo) -> dict:
    """Sum a global array of every process's rows (one row of four (p + 1)s per device of
    process p) with `sum` and with `psum`; each process returns both and the exact total."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((info.global_devices,), ("data",), axis_types=(AxisType.Auto,))
    rows = np.full((info.local_devices, 4), info.process_id + 1, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), rows)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a.sum(), "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(x)
    # Each process's (local device count, process id), gathered to compute the exact total.
    counts = multihost_utils.process_allgather(
        np.array([info.local_devices, info.process_id], np.int64))
    expected = float(sum(4 * int(n) * (int(p) + 1) for n, p in np.asarray(counts)))
    return {**asdict(info), "global_shape": list(x.shape),
            "sum": float(np.asarray(total.addressable_data(0))),
            "psum": float(np.asarray(psum.addressable_data(0))), "expected": expected}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gpt2jax.distributed --selftest | --resolve [settings]`."""
    ap = argparse.ArgumentParser(prog="python -m gpt2jax.distributed",
                                 description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--selftest", action="store_true",
                      help="connect, sum a global array across processes, print JSON")
    what.add_argument("--resolve", action="store_true",
                      help="print the resolved settings as JSON without connecting")
    ap.add_argument("--coordinator", default="", help="host:port of process 0")
    ap.add_argument("--num-processes", type=int, default=0)
    ap.add_argument("--process-id", type=int, default=-1)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--local-devices", type=int, default=0, help="CPU devices per process")
    args = ap.parse_args(argv)
    try:
        if args.resolve:
            p = plan(args.coordinator, args.num_processes, args.process_id)
            print_line(json.dumps(asdict(p)))
            return 0
        info = initialize(args.coordinator, args.num_processes, args.process_id,
                          args.timeout, args.local_devices)
        # The collectives take seconds; a peer lost mid-way must not leave us waiting.
        with _watchdog(args.timeout, f"process {info.process_id}: the selftest's collectives "
                                     f"did not finish within {args.timeout:g} s"):
            result = selftest(info)
    except UserError as e:
        print(f"gpt2jax: error: {e}", file=sys.stderr)
        return 2
    print_line(json.dumps(result))
    return 0 if result["sum"] == result["expected"] == result["psum"] else 1


if __name__ == "__main__":
    sys.exit(main())
