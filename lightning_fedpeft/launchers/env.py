"""Where this process stands in a launch: rank and world size from torchrun's environment variables.

Apart from the RPC runtime so that what only needs to know the rank (``devices.py``, picking a launcher)
does not import it.
"""

from __future__ import annotations

import os


def distributed_env() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torchrun-style environment variables, or ``None`` if absent/single."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return (int(os.environ["RANK"]), world) if world > 1 else None
