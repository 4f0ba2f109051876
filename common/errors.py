"""The one base class of every error this project raises on bad input or a failed step.

Each package's errors derive from `MoseError` *and* from the built-in class that says what kind of failure it is
(`ValueError` for bad input, `RuntimeError` for a step that failed), so callers can catch everything of ours with
one `except MoseError`, and code written against the built-in classes keeps working. A command catches
`MoseError`, prints its message (the file, the field, what was expected) and exits non-zero, never a traceback.
"""
from __future__ import annotations


class MoseError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigFileError(MoseError, ValueError):
    """A configuration file that cannot be read: missing, not UTF-8 text, not valid YAML, or of the wrong shape."""
