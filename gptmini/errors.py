"""The one base class for what the user must fix.

Every `gptmini` command prints a `UserError` as one line and exits 2; anything else is a runtime failure
and exits 1. Each module raises its own subclass (ConfigError, DataError, ...) so callers can tell them
apart, and the message names the value and the fix.
"""
from __future__ import annotations


class UserError(ValueError):
    """A value, path or name the user gave is wrong; the message names it and says how to fix it."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave does not exist or does not hold what it should."""


class Failure(RuntimeError):
    """A runtime failure the user can act on (the MLflow server is down, the GPU ran out of memory): not
    the user's input, so it exits 1, but still as one line that says what to check."""
