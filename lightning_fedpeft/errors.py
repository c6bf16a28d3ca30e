"""Errors the package raises on purpose, so that front ends can tell them from bugs."""

from __future__ import annotations


class SetupError(ValueError):
    """A setting the run cannot work with, found while ``fit`` sets up (before any training).

    The message names the setting and the fix; the CLI prints it without a traceback.
    """


class NoUpdateAccepted(RuntimeError):
    """The server accepted no client update for ``federation.max_empty_rounds`` rounds in a row.

    The global model stopped changing (every client diverged, say, or sent what the server refuses); the
    message gives each round's reasons. The run stops before that round's end is checkpointed, so the
    last checkpoint is kept as it was; the CLI prints the message without a traceback.
    """
