"""gpt2jax.distributed: settings resolution (pure), and bad settings ending cleanly and fast.

The real two-process run through launch/local.sh is in test_launch.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from gpt2jax import distributed as dist
from gpt2jax.errors import UserError
from gpt2jax.tracking import print_line

SLURM_GPU = {  # what srun sets for task 5 of 2 nodes x 4 tasks, every task seeing 4 GPUs
    "SLURM_JOB_ID": "4321",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
}


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("addr,expected", [
    ("127.0.0.1:1234", ("127.0.0.1", 1234)),
    ("node001:8476", ("node001", 8476)),
    ("lm-0.lm:8476", ("lm-0.lm", 8476)),
    ("[::1]:80", ("::1", 80)),
])
def test_parse_coordinator_good(addr, expected):
    assert dist.parse_coordinator(addr) == expected


@pytest.mark.parametrize("addr", ["localhost", "host:0", "host:70000", ":123", "a b:1", "h:p"])
def test_parse_coordinator_bad(addr):
    with pytest.raises(UserError, match="dist.coordinator"):
        dist.parse_coordinator(addr)


@pytest.mark.parametrize("nodelist,first", [
    ("node001", "node001"),
    ("node001,host2", "node001"),
    ("gpu[007-009,012],cpu1", "gpu007"),
    ("gpu[012,007-009]", "gpu012"),
    ("a[1-2]", "a1"),
])
def test_first_slurm_host(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


def test_slurm_local_device_ids_per_layout():
    # every task sees the node's 4 GPUs: drive GPU SLURM_LOCALID
    assert dist.slurm_local_device_ids(SLURM_GPU) == (1,)
    # --gpus-per-task=1: SLURM already bound one GPU; jax's choice (GPU 1) would not exist
    assert dist.slurm_local_device_ids({**SLURM_GPU, "CUDA_VISIBLE_DEVICES": "2"}) is None
    # one process per node: all of its GPUs (jax's default would keep only GPU 0)
    one = {**SLURM_GPU, "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_LOCALID": "0"}
    assert dist.slurm_local_device_ids(one) is None
    # uneven nodes: the count of this node (SLURM_NODEID 1 -> 1 task)
    assert dist.slurm_local_device_ids({**SLURM_GPU, "SLURM_STEP_TASKS_PER_NODE": "4,1"}) is None
    # the user's explicit JAX_LOCAL_DEVICE_IDS wins (jax reads it)
    assert dist.slurm_local_device_ids({**SLURM_GPU, "JAX_LOCAL_DEVICE_IDS": "3"}) is None


def test_plan_single_and_tpu():
    assert dist.plan(env={}, tpu=False) == dist.Plan(mode="single")
    assert dist.plan(env={}, tpu=True).mode == "tpu"
    assert dist.on_tpu_vm({"TPU_WORKER_HOSTNAMES": "a,b"})
    # one process named explicitly is still single-process
    assert dist.plan(num_processes=1, env={}, tpu=True).mode == "single"


def test_plan_from_env():
    env = {dist.ENV_COORDINATOR: "10.0.0.2:9000", dist.ENV_NUM_PROCESSES: "4",
           dist.ENV_PROCESS_ID: "3"}
    p = dist.plan(env=env, tpu=False)
    assert (p.mode, p.coordinator, p.num_processes, p.process_id) == (
        "explicit", "10.0.0.2:9000", 4, 3)
    assert p.source == "env" and p.local_device_ids is None


def test_plan_arguments_beat_env_beat_slurm():
    env = {**SLURM_GPU, dist.ENV_COORDINATOR: "10.0.0.2:9000", dist.ENV_PROCESS_ID: "2"}
    p = dist.plan(coordinator="10.0.0.9:1", env=env, tpu=False)
    assert p.coordinator == "10.0.0.9:1"  # argument
    assert p.process_id == 2  # env over SLURM_PROCID=5
    assert p.num_processes == 8  # SLURM
    assert p.local_device_ids is None  # the id is not SLURM's, so no per-GPU choice
    assert p.source == "config+env+slurm"
    p = dist.plan(num_processes=16, process_id=15, env=env, tpu=False)
    assert (p.num_processes, p.process_id, p.coordinator) == (16, 15, "10.0.0.2:9000")


def test_plan_from_slurm():
    p = dist.plan(env=SLURM_GPU, tpu=True)  # SLURM settings win over TPU auto-detection
    # same port rule as launch/slurm.sbatch: 20000 + job id % 20000
    assert p == dist.Plan(mode="explicit", coordinator="gpu007:24321", num_processes=8,
                          process_id=5, local_device_ids=(1,), source="slurm")
    p = dist.plan(env={**SLURM_GPU, dist.ENV_COORDINATOR_PORT: "1234"}, tpu=False)
    assert p.coordinator == "gpu007:1234"
    # the batch script itself (no srun, no SLURM_LOCALID) stays single-process
    batch = {k: v for k, v in SLURM_GPU.items() if k != "SLURM_LOCALID"}
    assert dist.plan(env=batch, tpu=False).mode == "single"


@pytest.mark.parametrize("kwargs,env,match", [
    ({}, {"GPT2JAX_NUM_PROCESSES": "2", "GPT2JAX_PROCESS_ID": "2",
          "GPT2JAX_COORDINATOR": "h:1"}, "process id 2 is out of range for 2 processes"),
    ({"num_processes": 2, "process_id": 5, "coordinator": "h:1"}, {}, "out of range"),
    ({}, {"GPT2JAX_NUM_PROCESSES": "0"}, "must be >= 1"),
    ({"num_processes": -1}, {}, "dist.num_processes=-1"),
    ({"process_id": -2}, {}, "dist.process_id=-2"),
    ({"num_processes": 2, "process_id": 0}, {}, "no coordinator address"),
    ({"num_processes": 2, "coordinator": "h:1"}, {}, "id is unknown"),
    ({"coordinator": "h:1"}, {}, "number of processes is unknown"),
    ({"num_processes": 2, "process_id": 1, "coordinator": "h"}, {}, "is not host:port"),
    ({}, {"GPT2JAX_PROCESS_ID": "one"}, "is not an integer"),
    ({}, {**SLURM_GPU, "SLURM_PROCID": "8"}, "out of range for 8"),
])
def test_plan_rejects_bad_settings(kwargs, env, match):
    with pytest.raises(UserError, match=match):
        dist.plan(env=env, tpu=False, **kwargs)


# ---------------------------------------------------------------- in this process

_DIST_VARS = [dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID,
              dist.ENV_LOCAL_DEVICES, "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID",
              "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"]


@pytest.fixture
def clean_env(monkeypatch):
    for var in _DIST_VARS:
        monkeypatch.delenv(var, raising=False)


def test_initialize_single_process(clean_env):
    import jax

    n = jax.device_count()  # conftest's fake CPU devices
    info = dist.initialize()
    assert info == dist.DistInfo(0, 1, n, n, "", "single")
    assert dist.initialize(local_device_count=n).local_devices == n  # matches: fine


def test_initialize_after_jax_started_refuses(clean_env):
    import jax

    jax.devices()
    with pytest.raises(UserError, match="already runs with"):
        dist.initialize(local_device_count=jax.device_count() + 1)
    with pytest.raises(RuntimeError, match="before any other JAX call"):
        dist.initialize("127.0.0.1:9", num_processes=2, process_id=1)
    with pytest.raises(UserError, match="dist.timeout"):
        dist.initialize(timeout=0)


def test_wait_for_coordinator_gives_up(free_port):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"did not answer within dist.timeout=0.5 s"):
        dist.wait_for_coordinator("127.0.0.1", free_port, time.monotonic() + 0.5, 0.5)
    assert time.monotonic() - t0 < 3
    with socket.create_server(("127.0.0.1", 0)) as srv:  # something listening: returns
        dist.wait_for_coordinator("127.0.0.1", srv.getsockname()[1], time.monotonic() + 5, 5)


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now (all held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port() -> int:
    return _free_ports(1)[0]


@pytest.fixture
def free_port() -> int:
    return _free_port()


# ---------------------------------------------------------------- real processes


def _start(env_extra: dict[str, str], timeout: float = 5) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    cmd = [sys.executable, "-m", "gpt2jax.distributed", "--selftest", "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, time.monotonic()


def test_bad_settings_end_cleanly_within_timeout():
    """Each case: exit 2, last stderr line `gpt2jax: error: ...`, no hang, no C++ abort."""
    with socket.create_server(("0.0.0.0", 0)) as busy:  # a port some other program holds
        busy_port = busy.getsockname()[1]
        # Nobody listens on either; two ports, or the two lone processes would meet.
        dead_port, silent_port = _free_ports(2)
        dead = f"127.0.0.1:{dead_port}"
        cases = {
            # a worker whose coordinator never answers
            "unreachable": ({"GPT2JAX_COORDINATOR": f"127.0.0.1:{silent_port}",
                             "GPT2JAX_NUM_PROCESSES": "2", "GPT2JAX_PROCESS_ID": "1"},
                            "did not answer within dist.timeout=5"),
            # the coordinator whose peers never come
            "alone": ({"GPT2JAX_COORDINATOR": dead, "GPT2JAX_NUM_PROCESSES": "2",
                       "GPT2JAX_PROCESS_ID": "0"}, "not all processes connected"),
            "busy_port": ({"GPT2JAX_COORDINATOR": f"127.0.0.1:{busy_port}",
                           "GPT2JAX_NUM_PROCESSES": "2", "GPT2JAX_PROCESS_ID": "0"},
                          f"port {busy_port} is taken"),
            "id_out_of_range": ({"GPT2JAX_COORDINATOR": dead, "GPT2JAX_NUM_PROCESSES": "2",
                                 "GPT2JAX_PROCESS_ID": "2"}, "process id 2 is out of range"),
            "zero_processes": ({"GPT2JAX_NUM_PROCESSES": "0", "GPT2JAX_PROCESS_ID": "0"},
                               "GPT2JAX_NUM_PROCESSES=0"),
            "malformed": ({"GPT2JAX_COORDINATOR": "127.0.0.1", "GPT2JAX_NUM_PROCESSES": "2",
                           "GPT2JAX_PROCESS_ID": "1"}, "is not host:port"),
        }
        running = {name: (_start(env), match) for name, (env, match) in cases.items()}
        for name, ((proc, t0), match) in running.items():
            out, err = proc.communicate(timeout=60)
            elapsed = time.monotonic() - t0
            last = (err.strip().splitlines() or [""])[-1]
            assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
            assert last.startswith("gpt2jax: error: ") and match in last, (name, last)
            assert "Check failure" not in err and "Traceback" not in err, name
            # 5 s timeout + six interpreters importing jax at once on a busy 2-core machine;
            # exit 2 without "Check failure" already shows ours fired, not jax's (at 35 s)
            assert elapsed < 50, (name, elapsed)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)")
def test_slurm_run_connects_only_to_loopback(tmp_path):
    """Two processes started as srun starts them (faked SLURM_* variables, nothing else)
    connect through SLURM resolution, and every connect() of theirs, traced by strace,
    goes to 127.0.0.1 or a local socket: no cloud metadata server, no other host."""
    port = _free_port()
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2", dist.ENV_COORDINATOR_PORT: str(port)}
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
        env.update(JAX_PLATFORMS="cpu", SLURM_PROCID=str(i), SLURM_LOCALID=str(i), **slurm)
        trace = tmp_path / f"connect-{i}.txt"
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), sys.executable,
               "-m", "gpt2jax.distributed", "--selftest", "--timeout", "30"]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True), trace))
    for proc, _ in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        # gloo's threads write "[Gloo] Rank ..." lines to stdout in pieces, so the JSON line
        # (one write, see print_line) may begin in the middle of one of them
        result = json.loads(re.search(r'\{"process_id".*\}', out).group())
        assert result["num_processes"] == 2 and result["source"] == "slurm"
        assert result["sum"] == result["expected"] == result["psum"]
    for _, trace in procs:
        calls = [ln for ln in trace.read_text().splitlines() if "connect(" in ln]
        assert any(f"htons({port})" in c for c in calls)  # the trace saw the real connects
        remote = [c for c in calls if "AF_UNIX" not in c and '"127.0.0.1"' not in c
                  and '"::ffff:127.0.0.1"' not in c and '"::1"' not in c]
        assert not remote, remote


def test_resolve_command_prints_the_plan(clean_env, monkeypatch, capsys):
    monkeypatch.setenv(dist.ENV_COORDINATOR, "10.1.1.1:7000")
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "3")
    assert dist.main(["--resolve", "--process-id", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"mode": "explicit", "coordinator": "10.1.1.1:7000", "num_processes": 3,
                   "process_id": 2, "local_device_ids": None, "source": "config+env"}
    assert dist.main(["--resolve", "--process-id", "3"]) == 2
    assert capsys.readouterr().err.startswith("gpt2jax: error: process id 3 is out of range")


_INTERLEAVE_SCRIPT = """
import os, threading
from gpt2jax.tracking import print_line
stop = threading.Event()
def gloo():  # what gloo does under PYTHONUNBUFFERED: a line as several small writes
    while True:  # at least one whole message, however the threads are scheduled
        for piece in ("[Gloo] Rank ", "0", " is connected to ", "3", " peer ranks.", "\\n"):
            os.write(1, piece.encode())
        if stop.is_set():
            break
t = threading.Thread(target=gloo)
t.start()
for i in range(300):
    print_line('{"process_id": 0, "i": %d}' % i)
stop.set()
t.join()
"""


class _Writes(list):
    """A text stream that records each write call."""

    def write(self, text: str) -> int:
        self.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_print_line_keeps_a_line_whole_among_other_threads_writes():
    """The selftest's JSON line stays contiguous while another thread writes fragments."""
    writes = _Writes()
    print("{}", file=writes)
    assert writes == ["{}", "\n"]  # why: print's newline is a write of its own
    writes.clear()
    print_line("{}", file=writes)
    assert writes == ["{}\n"]
    # A real process under PYTHONUNBUFFERED, with a thread writing gloo-like fragments.
    r = subprocess.run([sys.executable, "-c", _INTERLEAVE_SCRIPT],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[Gloo] Rank ") > 0
    missing = [i for i in range(300) if f'{{"process_id": 0, "i": {i}}}\n' not in r.stdout]
    assert missing == []


_BARRIER_SCRIPT = """
import sys, time
from gpt2jax import distributed as dist
from gpt2jax.errors import UserError
delay, timeout = float(sys.argv[1]), float(sys.argv[2])
dist.initialize(timeout=30)  # coordinator, count and id from GPT2JAX_* variables
time.sleep(delay)
try:
    for _ in range(2):  # the same name twice: each wait is its own barrier
        dist.wait_for_peers("test", timeout, "the other test process")
except UserError as e:
    print(f"gpt2jax: error: {e}", file=sys.stderr)
    dist.leave_on_error(2)  # what the CLI does: no shutdown barrier with a waiting peer
    sys.exit(99)  # not reached in a two-process run
print("through")
"""


def _barrier_pair(delays: tuple[float, float], timeout: float) -> list[tuple[int, str, str]]:
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(JAX_PLATFORMS="cpu", GPT2JAX_COORDINATOR=coordinator, GPT2JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", _BARRIER_SCRIPT, str(delay), str(timeout)],
                              env={**env, "GPT2JAX_PROCESS_ID": str(i)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, delay in enumerate(delays)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append((p.returncode, out, err))
    return results


def test_wait_for_peers_is_a_real_barrier_and_times_out_cleanly():
    """Two real processes: both pass the (coordination-service) barrier twice; then process
    0 arrives late and process 1 gives up after its timeout with a one-line error."""
    for code, out, err in _barrier_pair((0.0, 0.0), 30):
        assert code == 0 and out.strip() == "through", err[-2000:]
    t0 = time.monotonic()
    (code0, _, err0), (code1, out1, err1) = _barrier_pair((10.0, 0.0), 2)
    assert code1 == 2 and "through" not in out1, err1[-2000:]
    last = err1.strip().splitlines()[-1]
    assert last.startswith("gpt2jax: error: process 1 of 2: waited 2 s for the other test "
                           "process"), last
    assert "Traceback" not in err1
    assert code0 != 0  # the late one finds its peer gone or times out too; nobody hangs
    assert time.monotonic() - t0 < 60
