"""The one exception type that means "the user's input is wrong".

The CLI turns it into exit status 2 and a single `gpt2jax: error: ...` line;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: say what is wrong, where, and how to fix it."""


