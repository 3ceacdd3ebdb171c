"""User-facing errors.

Everything a user can get wrong (a model name, a depth, a flag, a file) raises a
:class:`UserError`. The command line prints its message as one line and exits with
status 2; library callers can catch it like any ``ValueError``.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong and what to do."""

    exit_code = 2


class UnknownModelError(UserError):
    """The model name is not in the registry."""


class ConfigError(UserError):
    """A model or training configuration that cannot be built (bad depth, width, flag)."""


class InputError(UserError):
    """An input tensor the model cannot take (too small, wrong channel count)."""


class DataError(UserError):
    """Missing, truncated or corrupt data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or for another model."""


class WriteError(UserError, OSError):
    """A file could not be written (disk full, read-only, no permission). What was partly written
    has been removed and what was there before is untouched.

    Also an :class:`OSError` (with ``errno`` and ``filename`` set), so code that tolerates a failed
    write (a disposable cache) keeps tolerating it."""

    def __init__(self, message: str, code: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno, self.filename = code, path

    def __str__(self) -> str:  # OSError's would print "[Errno N] ..." instead of the message
        return self.message
