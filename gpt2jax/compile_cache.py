"""A persistent cache of compiled XLA programs, so that a later command with the same
shapes loads its programs instead of compiling them.

Every `gpt2jax` command is a fresh process, and a `generate` or `eval` that decodes for a
second can spend most of its time compiling. With the cache on (the command line's
default) programs go under `$GPT2JAX_CACHE/xla` (default `~/.cache/gpt2jax/xla`), or
where `GPT2JAX_COMPILE_CACHE` says (`off`: none). JAX bounds it (`MAX_BYTES`, least
recently used entries go) and guards it with a file lock, so processes can share it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV = "GPT2JAX_COMPILE_CACHE"
# A compile shorter than this is not written: it costs about what reading the entry back
# costs, and tiny programs (a PRNG split, a reshape) would fill the directory. JAX's own
# variable, when set, wins (tests set 0, so what is written never depends on the load).
MIN_COMPILE_SECONDS = 0.2
MIN_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
MAX_BYTES = 4 << 30

_counts = {"hits": 0, "misses": 0, "listening": False}
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "misses"}


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """gpt2jax's cache directory: $GPT2JAX_CACHE, else ~/.cache/gpt2jax."""
    return Path(environ.get("GPT2JAX_CACHE") or "~/.cache/gpt2jax").expanduser()


def location(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where compiled programs are cached, or None when GPT2JAX_COMPILE_CACHE=off."""
    choice = environ.get(ENV, "").strip()
    if choice.lower() == "off":
        return None
    return Path(choice).expanduser() if choice else cache_root(environ) / "xla"


def enable(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Turn the cache on for this process (before its first compile) and count its hits;
    returns the directory, or None when it is off."""
    directory = location(environ)
    if directory is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(environ.get(MIN_ENV, MIN_COMPILE_SECONDS)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if not _counts["listening"]:
        jax.monitoring.register_event_listener(_count)
        _counts["listening"] = True
    return directory


def _count(event: str, **_) -> None:
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


def summary() -> str:
    """One line for the end of a command: programs loaded from the cache and compiled."""
    hits, misses = _counts["hits"], _counts["misses"]
    if not hits + misses:
        return ""
    return (f"compile cache: {hits} program{'s' * (hits != 1)} loaded, {misses} compiled "
            f"({location()})")
