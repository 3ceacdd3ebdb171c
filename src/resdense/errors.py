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
