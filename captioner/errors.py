"""User-facing errors.

A :class:`CaptionerError` is a mistake in the user's input (a file, a config key, a
checkpoint): the command line prints its message on one line and exits with code 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """An error caused by the user's input; the message says what and where."""


class ConfigError(CaptionerError):
    """A config file, key or value is wrong."""


class DataError(CaptionerError):
    """A data file (annotations or image) is missing, malformed or unusable."""


class CheckpointError(CaptionerError):
    """A checkpoint cannot be loaded or does not fit the model or vocabulary."""
