"""One error type for everything a user can fix; the CLI maps it to one line and exit code 2."""

from __future__ import annotations


class K2MiniError(Exception):
    """A problem with the user's input or environment, stated so they can act on it.

    The message should name the file, tensor or flag at fault. The CLI prints it as a
    single line (no traceback unless --debug) and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class CheckpointError(K2MiniError):
    """The checkpoint on disk (or on the Hub) is missing, malformed or inconsistent."""


class UsageError(K2MiniError):
    """A flag or combination of flags that cannot be satisfied."""
