"""Huge pages for XLA's host buffers: glibc's `glibc.malloc.hugetlb=1` tunable.

XLA on CPU allocates a step's temporary buffers afresh on every execution, and glibc
serves large allocations with new mmaps, so every step faults in its working set again
4 KiB at a time (about 107,000 minor faults, 0.2 s of kernel time per step for the
4-layer bench config). With the tunable, glibc asks for transparent huge pages on those
mmaps and the faults drop to about 600: 8-25% more tokens/s on CPU (docs/perf-notes.md
16). glibc reads tunables only at process start, so the `gpt2jax` command restarts itself
once with the tunable added; `GPT2JAX_HUGEPAGES=0` turns that off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "GPT2JAX_HUGEPAGES"
# set by ensure(): the GLIBC_TUNABLES the user started with ("" for none)
BEFORE = "GPT2JAX_GLIBC_TUNABLES_BEFORE"


def _setting(environ: Mapping[str, str]) -> str | None:
    """The tunable's value in GLIBC_TUNABLES, None when it is not there."""
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        key, _, value = item.partition("=")
        if key == TUNABLE:
            return value
    return None


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's GLIBC_TUNABLES asks glibc's malloc for huge pages (1 or 2)."""
    return _setting(environ) in ("1", "2")


def _thp_usable(path: str) -> bool:
    """Transparent huge pages in `madvise` or `always` mode (the tunable needs one)."""
    try:
        with open(path) as f:
            mode = f.read()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


def restart_env(environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                thp_path: str = THP_ENABLED) -> dict[str, str] | None:
    """The environment to restart with (the tunable appended), or None to run as is.

    None when not on Linux, when transparent huge pages are off, when GLIBC_TUNABLES
    already sets the tunable (either way: an explicit choice wins, and it stops a second
    restart) or when GPT2JAX_HUGEPAGES=0.
    """
    if not platform.startswith("linux") or environ.get(OPT_OUT, "1") == "0":
        return None
    if _setting(environ) is not None or not _thp_usable(thp_path):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    env[BEFORE] = tunables
    return env


def user_environ(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment as the user launched gpt2jax: what ensure() added taken out (for
    child processes that should run as they would on their own, like the bench's torch)."""
    env = dict(environ)
    if BEFORE in env:
        before = env.pop(BEFORE)
        if before:
            env["GLIBC_TUNABLES"] = before
        else:
            env.pop("GLIBC_TUNABLES", None)
    return env


def ensure() -> None:
    """Restart this process (same PID, same arguments) with the tunable, if restart_env
    says so. Call it first thing in a command's entry point, before jax is imported."""
    env = restart_env()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
