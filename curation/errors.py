"""The curation library's errors (in a module of their own, so every curation module can raise them without
importing the selector interface)."""
from __future__ import annotations

from common.errors import MoseError


class SelectionError(MoseError, ValueError):
    """Bad selector input (budget, features, scores) or a manifest that does not fit its header."""


class PilotError(MoseError, RuntimeError):
    """A pilot run failed or returned no usable score."""
