"""The exceptions the CLI turns into an exit status instead of a traceback.

`UserError`: exit status 2 and a single `gpt2jax: error: ...` line. `Preempted`: 128 +
the signal's number. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    """Bad input: say what is wrong, where, and how to fix it."""


class Preempted(Exception):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) arrived; a checkpoint was saved. The CLI
    exits with 128 + the signal's number (143, 130)."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGTERM):
        what = "interrupted" if signum == signal.SIGINT else "preempted"
        super().__init__(f"{what}: saved checkpoint at step {step} to {path} (run the same "
                         "command again to continue)")
        self.step, self.path, self.exit_status = step, path, 128 + signum
