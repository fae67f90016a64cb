"""glibc's malloc for XLA's host buffers: huge pages, and memory kept for reuse.

XLA on CPU allocates a step's temporary buffers afresh on every execution, and glibc
serves allocations above its mmap threshold (at most 32 MB) with fresh mmaps that it
unmaps on free. So every step faults its working set in again and the kernel zeroes it
(4-layer bench config: 107,000 faults a step in 4 KiB pages; GPT-2 small: about 5 GB a
step). On this VM freed memory is also handed back to the hypervisor (free page
reporting), and the next fault on it stalls for milliseconds. Two tunables help:

- `glibc.malloc.hugetlb=1`: transparent huge pages for malloc's mmaps (about 600 faults
  a step; docs/perf-notes.md section 7);
- never giving memory back (`mmap_max=0`, one arena, no trimming): after a few steps the
  heap holds the step's peak and nothing is faulted or zeroed again. GPT-2 small: median
  4.0 -> 3.2 s a step, without the 0.4-2 s stalls (perf-notes section 7). The price: the
  process keeps its peak memory (plus fragmentation) between steps. The restart does
  not know the backend; on GPU/TPU hosts (host buffers only) it is unmeasured.

Both are opt-in, because both change what a Python program is expected to do with its
memory. glibc reads tunables only at process start, so when asked the `gpt2jax` command
restarts itself once (`os.execve`: same PID, same arguments) with the policy's tunables
appended. Policies, by `GPT2JAX_MALLOC`: `system` (the default: glibc as it is, no
restart), `hugepages` (huge pages only), `keep` (both). A GLIBC_TUNABLES that already
sets any `glibc.malloc.*` tunable is the user's choice and is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

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
    """The policy asked for: GPT2JAX_MALLOC, else the default. Raises ValueError for an
    unknown name."""
    name = environ.get(CHOICE)
    if name is None:
        return DEFAULT
    if name not in POLICIES:
        raise ValueError(f"{CHOICE}={name!r} is not a malloc policy: use "
                         f"{', '.join(POLICIES)} (or unset it for {DEFAULT})")
    return name


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """The policy a process with this environment runs under: a policy's name when its
    malloc tunables are exactly that policy's, `custom` for other malloc tunables."""
    ours = sorted(f"{k}={v}" for k, v in _tunables(environ).items()
                  if k.startswith("glibc.malloc."))
    for name, tunables in POLICIES.items():
        if ours == sorted(tunables):
            return name
    return "custom"


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
    """The environment to restart with (the policy's tunables appended), or None to run
    as is: not on Linux, policy `system`, transparent huge pages off (both policies
    build on them; never returning memory in 4 KiB pages made config A slower), or
    GLIBC_TUNABLES already setting a `glibc.malloc.*` tunable (an explicit choice wins,
    and it stops a second restart)."""
    add = POLICIES[policy(environ)]
    if not platform.startswith("linux") or not add:
        return None
    if any(k.startswith("glibc.malloc.") for k in _tunables(environ)):
        return None
    if not _thp_usable(thp_path):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([tunables, *add] if tunables else add)
    return env


def ensure() -> None:
    """Restart this process (same PID, same arguments) with the policy's tunables, if
    restart_env says so. Call it first thing in a command's entry point, before jax is
    imported. An unknown GPT2JAX_MALLOC exits with status 2 and one line on stderr."""
    try:
        env = restart_env()
    except ValueError as e:
        print(f"gpt2jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
