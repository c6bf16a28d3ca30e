"""quiet_transformers: one context manager for loading without transformers' reports and progress bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging (errors still show) and its progress bars, as they were after.

    A load prints a report listing the (expected) fresh classifier head and, for a cut model, the unused
    upper layers, and a progress bar per checkpoint shard; the run's own output stays readable without.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
