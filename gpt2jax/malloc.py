"""glibc's malloc for XLA's host buffers: huge pages, and memory kept for reuse.

Opt-in by `GPT2JAX_MALLOC`: `system` (default: glibc as it is), `hugepages` or `keep`
(huge pages and a heap never given back). The `gpt2jax` command restarts itself once with
the policy's tunables in GLIBC_TUNABLES; why, and what each gains: docs/perf-notes.md
section 7.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

HUGEPAGES = "glibc.malloc.hugetlb=1"
POLICIES: dict[str, tuple[str, ...]] = {
    "keep": (HUGEPAGES, "glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
             f"glibc.malloc.trim_threshold={2 ** 36}"),
    "hugepages": (HUGEPAGES,),
    "system": (),
}
DEFAULT = "system"
CHOICE = "GPT2JAX_MALLOC"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    items = (i.partition("=") for i in environ.get("GLIBC_TUNABLES", "").split(":") if i)
    return {key: value for key, _, value in items}


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's GLIBC_TUNABLES asks glibc's malloc for huge pages (1 or 2)."""
    return _tunables(environ).get("glibc.malloc.hugetlb") in ("1", "2")


def keeps_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether glibc's malloc never unmaps memory here (mmap_max=0, as in `keep`)."""
    return _tunables(environ).get("glibc.malloc.mmap_max") == "0"


def policy(environ: Mapping[str, str] = os.environ) -> str:
    """The policy asked for (GPT2JAX_MALLOC, else the default); ValueError for an unknown one."""
    name = environ.get(CHOICE)
    if name is None:
        return DEFAULT
    if name not in POLICIES:
        raise ValueError(f"{CHOICE}={name!r} is not a malloc policy: use "
                         f"{', '.join(POLICIES)} (or unset it for {DEFAULT})")
    return name


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """The policy whose malloc tunables this environment has exactly, else `custom`."""
    ours = sorted(f"{k}={v}" for k, v in _tunables(environ).items()
                  if k.startswith("glibc.malloc."))
    for name, tunables in POLICIES.items():
        if ours == sorted(tunables):
            return name
    return "custom"


def _thp_usable(path: str) -> bool:
    """Transparent huge pages in `madvise` or `always` mode (the tunable needs one)."""
    try:
        mode = Path(path).read_text()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


def restart_env(environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                thp_path: str = THP_ENABLED) -> dict[str, str] | None:
    """The environment to restart with (the policy's tunables appended), or None to run
    as is: not on Linux, policy `system`, a `glibc.malloc.*` tunable already set (the
    user's choice; it also stops a second restart), or transparent huge pages off."""
    add = POLICIES[policy(environ)]
    user_set = any(k.startswith("glibc.malloc.") for k in _tunables(environ))
    if not platform.startswith("linux") or not add or user_set or not _thp_usable(thp_path):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([tunables, *add] if tunables else add)
    return env


def ensure() -> None:
    """Restart this process with the policy's tunables if restart_env says so; call it
    before jax is imported. An unknown GPT2JAX_MALLOC exits with status 2 and one line."""
    try:
        env = restart_env()
    except ValueError as e:
        print(f"gpt2jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
