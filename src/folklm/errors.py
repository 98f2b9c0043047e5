"""User-facing errors.

Every mistake a user can make (a missing file, a bad flag, an unsupported model) raises a
``FolkError`` whose message is one line naming the file, field or value at fault. The CLI
prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FolkError(Exception):
    """An error caused by user input, with a one-line message that says what to fix."""


class CheckpointError(FolkError):
    """A model file or folder is missing, corrupt, or not in a format folklm can load."""


class ConfigError(FolkError):
    """A ``config.json`` field is missing, has the wrong type, or names something unsupported."""
