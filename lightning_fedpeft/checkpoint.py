"""Checkpoints a crash cannot break: written to a temporary file beside the target, then renamed over it.

Lightning's ``TorchCheckpointIO`` writes the target file in place, so a process killed while it writes
(a job at its wall-clock limit, ``kill -9``) leaves a truncated ``last.ckpt`` that no run can resume
from. ``os.replace`` is atomic on a local file system: the file is the old checkpoint or the new one,
never half of one. Remote paths (``s3://...``) are left to Lightning's own writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
