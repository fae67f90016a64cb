"""gpt2jax/hugepages.py: when the command restarts itself with glibc's huge-page malloc."""

import os
import subprocess
import sys

import pytest

from gpt2jax import hugepages


@pytest.fixture
def thp(tmp_path):
    def make(mode: str) -> str:
        path = tmp_path / "enabled"
        path.write_text(mode)
        return str(path)
    return make


def test_active_reads_the_tunable():
    assert hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert hugepages.active({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.hugetlb=2"})
    assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb_x=1"})
    assert not hugepages.active({})


def test_restart_env_appends_the_tunable(thp):
    path = thp("always [madvise] never\n")
    env = hugepages.restart_env({"PATH": "/bin"}, "linux", path)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                   hugepages.BEFORE: ""}
    assert hugepages.user_environ(env) == {"PATH": "/bin"}  # as the user started it
    user = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
    env = hugepages.restart_env(user, "linux", thp("[always] madvise never\n"))
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
    assert hugepages.active(env) and not hugepages.active(hugepages.user_environ(env))
    assert hugepages.user_environ(env) == user
    # a tunable the user set themselves is theirs: children keep it
    assert hugepages.user_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ,platform,mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", "[madvise]"),  # explicit choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "linux", "[madvise]"),  # already restarted
    ({"GPT2JAX_HUGEPAGES": "0"}, "linux", "[madvise]"),                    # opted out
    ({}, "darwin", "[madvise]"),                                           # no glibc
    ({}, "linux", "always madvise [never]"),                               # THP off
])
def test_restart_env_none(thp, environ, platform, mode):
    assert hugepages.restart_env(environ, platform, thp(mode)) is None


def test_restart_env_without_thp_file(tmp_path):
    assert hugepages.restart_env({}, "linux", str(tmp_path / "missing")) is None


@pytest.mark.skipif(hugepages.restart_env({}) is None, reason="no transparent huge pages here")
def test_ensure_restarts_once_with_the_same_arguments(tmp_path):
    """A real exec: the child runs the same command line again, now with the tunable, and
    does not restart a second time (the counter file gets exactly two lines)."""
    code = ("import os, sys; from gpt2jax import hugepages; "
            "open(sys.argv[1], 'a').write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n'); "
            "hugepages.ensure(); print(os.getpid(), sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GPT2JAX_HUGEPAGES")}
    log = tmp_path / "starts.log"
    p = subprocess.run([sys.executable, "-c", code, str(log), "arg two"], env=env,
                       capture_output=True, text=True, timeout=60, check=True)
    lines = log.read_text().splitlines()
    assert lines == ["-", "glibc.malloc.hugetlb=1"]
    pid, arg = p.stdout.strip().split(" ", 1)
    assert int(pid) > 0 and arg == "arg two"
