"""gpt2jax/malloc.py: when and how the command restarts itself with a glibc malloc policy."""

import json
import os
import re
import subprocess
import sys

import pytest

from gpt2jax import malloc

KEEP = ":".join(malloc.POLICIES["keep"])


def _thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or why
    there is none."""
    try:
        with open(malloc.THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return f"absent ({malloc.THP_ENABLED} cannot be read)"
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else text.strip()


# Both malloc policies build on transparent huge pages, so these tests can only run where
# the kernel offers them; anywhere else (madvise or always) they must run, not skip.
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
    reason=f"transparent huge pages are {_thp_mode()} in this kernel "
           f"({malloc.THP_ENABLED}); the malloc policies need madvise or always")


@pytest.fixture
def thp(tmp_path):
    def make(mode: str) -> str:
        path = tmp_path / "enabled"
        path.write_text(mode)
        return str(path)
    return make


def test_active_reads_the_tunable():
    assert malloc.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert malloc.active({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.hugetlb=2"})
    assert malloc.active({"GLIBC_TUNABLES": KEEP})
    assert not malloc.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not malloc.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb_x=1"})
    assert not malloc.active({})
    assert malloc.keeps_memory({"GLIBC_TUNABLES": KEEP})
    assert not malloc.keeps_memory({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_policy_names():
    assert malloc.policy({}) == "system"  # the default: glibc as it is
    assert malloc.describe({}) == "system"
    assert malloc.describe({"GLIBC_TUNABLES": f"glibc.pthread.rseq=0:{KEEP}"}) == "keep"
    assert malloc.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "hugepages"
    assert malloc.describe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == "custom"
    assert malloc.policy({"GPT2JAX_MALLOC": "hugepages"}) == "hugepages"
    with pytest.raises(ValueError, match="GPT2JAX_MALLOC='fast' is not a malloc policy: use "
                                         "keep, hugepages, system"):
        malloc.policy({"GPT2JAX_MALLOC": "fast"})


def test_restart_env_appends_the_policy(thp):
    path = thp("always [madvise] never\n")
    assert malloc.restart_env({"PATH": "/bin"}, "linux", path) is None  # default: no restart
    env = malloc.restart_env({"PATH": "/bin", "GPT2JAX_MALLOC": "keep"}, "linux", path)
    assert env == {"PATH": "/bin", "GPT2JAX_MALLOC": "keep", "GLIBC_TUNABLES": KEEP}
    assert "glibc.malloc.mmap_max=0" in env["GLIBC_TUNABLES"].split(":")
    user = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "GPT2JAX_MALLOC": "hugepages"}
    env = malloc.restart_env(user, "linux", thp("[always] madvise never\n"))
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
    assert malloc.active(env) and not malloc.active(user)


@pytest.mark.parametrize("environ,platform,mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", "[madvise]"),   # explicit choice
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, "linux", "[madvise]"),  # explicit choice
    ({"GLIBC_TUNABLES": KEEP}, "linux", "[madvise]"),                        # restarted already
    ({"GPT2JAX_MALLOC": "system"}, "linux", "[madvise]"),                    # opted out
    ({}, "darwin", "[madvise]"),                                             # no glibc
    ({}, "linux", "always madvise [never]"),                                 # THP off
])
def test_restart_env_none(thp, environ, platform, mode):
    assert malloc.restart_env(environ, platform, thp(mode)) is None


def test_restart_env_without_thp_file(tmp_path):
    assert malloc.restart_env({}, "linux", str(tmp_path / "missing")) is None


def _clean_env(**extra) -> dict:
    drop = ("GLIBC_TUNABLES", "GPT2JAX_MALLOC")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def test_ensure_by_default_runs_as_is(tmp_path):
    """The default policy (`system`): a real start with no malloc variables does not restart
    and leaves GLIBC_TUNABLES unset."""
    code = ("import os, sys; from gpt2jax import malloc; "
            "open(sys.argv[1], 'a').write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n'); "
            "malloc.ensure(); print(os.environ.get('GLIBC_TUNABLES', '-'))")
    log = tmp_path / "starts.log"
    p = subprocess.run([sys.executable, "-c", code, str(log)], env=_clean_env(),
                       capture_output=True, text=True, timeout=60, check=True)
    assert log.read_text().splitlines() == ["-"] and p.stdout.strip() == "-"


@needs_thp
def test_ensure_restarts_once_with_the_same_arguments(tmp_path):
    """A real exec: the child runs the same command line again, now with the tunables, and
    does not restart a second time (the counter file gets exactly two lines)."""
    code = ("import os, sys; from gpt2jax import malloc; "
            "open(sys.argv[1], 'a').write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n'); "
            "malloc.ensure(); print(os.getpid(), sys.argv[2])")
    log = tmp_path / "starts.log"
    p = subprocess.run([sys.executable, "-c", code, str(log), "arg two"],
                       env=_clean_env(GPT2JAX_MALLOC="keep"),
                       capture_output=True, text=True, timeout=60, check=True)
    assert log.read_text().splitlines() == ["-", KEEP]
    pid, arg = p.stdout.strip().split(" ", 1)
    assert int(pid) > 0 and arg == "arg two"


def test_unknown_policy_is_a_clean_error():
    p = subprocess.run([sys.executable, "-m", "gpt2jax", "--help"], capture_output=True,
                       text=True, timeout=120, env=_clean_env(GPT2JAX_MALLOC="fast"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "gpt2jax: error: GPT2JAX_MALLOC='fast' is not a malloc policy: use keep, hugepages, "
        "system (or unset it for system)")
    assert "Traceback" not in p.stderr


@needs_thp
def test_a_command_runs_under_keep_when_asked():
    """The opt-in policy, which the in-process tests do not run under: a real
    `gpt2jax bench` restarted into `keep` compiles, trains and reports, with keep's
    tunables in its environment and the policy named in its result."""
    tiny = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-positions", "64",
            "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1",
            "--rounds", "1", "--peak-size", "128"]
    p = subprocess.run([sys.executable, "-m", "gpt2jax", "bench", *tiny, "--json"],
                       capture_output=True, text=True, timeout=300,
                       env=_clean_env(GPT2JAX_MALLOC="keep"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["env"]["GLIBC_TUNABLES"] == KEEP and r["jax"]["malloc"] == "keep"
    assert r["jax"]["tokens_per_sec"] > 0 and r["jax"]["page_faults_per_step"] >= 0
    assert 1 <= r["config"]["settle_rounds"] <= 8
