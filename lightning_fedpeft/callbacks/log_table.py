"""Writing a per-round (or per-decision) table as CSV next to the logger's files."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def write_log_table(trainer: pl.Trainer, filename: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """Rewrite ``<log_dir>/<filename>`` with ``rows`` (columns: every key, in order of first appearance).

    Only beside a logger's files: with ``logger=False`` Lightning's ``log_dir`` is the working directory,
    which must not fill up with tables. Returns the path written, or ``None``.
    """
    if not rows or not trainer.loggers or trainer.log_dir is None:
        return None
    path = Path(trainer.log_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
