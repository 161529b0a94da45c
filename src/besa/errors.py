"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

from __future__ import annotations

__all__ = ["BesaError"]


class BesaError(Exception):
    """A problem with the user's input (path, option, data), reported without a traceback."""
