"""The package's one exception type: every user-facing refusal is a :class:`ToEError` whose message is one line that
names the offending value and the fix (the CLI prints it as ``toe: error: ...`` and exits 2). It has a module of its
own so that any module can raise it without importing the configs."""

from __future__ import annotations


class ToEError(ValueError):
    """A user-facing error: its message is one line that names the offending value and the fix."""
