"""Errors the package raises on purpose, so that front ends can tell them from bugs."""

from __future__ import annotations


class SetupError(ValueError):
    """A setting the run cannot work with, found while ``fit`` sets up (before any training).

    The message names the setting and the fix; the CLI prints it without a traceback.
    """
