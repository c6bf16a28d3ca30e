"""The round table (``RoundSync.history``, ``rounds.csv``) and the strategy's tables: built and written here only.

One row per round. On the server's process it comes from the server's :class:`RoundRecord`: clients,
missing, the clients' mean training loss, bytes each way (and on the wire, with compression), the
simulated round and clock (with a cost model), the means of what the algorithms' client halves report,
what the strategy and the transport log, who was missing or rejected, the round's wall time and the
validation metrics of the global model. Client processes keep a short row of their own clients. CSVs are
written only beside a logger's files (with ``logger=False`` Lightning's ``log_dir`` is the working
directory, which must not fill up with tables).

Each row the server adds is also one plain line on the ``lightning_fedpeft.progress`` logger (INFO):
round, clients, loss, validation metrics, megabytes, seconds and the time left, for log files where a
progress bar prints nothing (SLURM, nohup, torchrun's logs, CI). The CLI shows it when its output is not
a terminal; route it like any Python logger.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_fedpeft.protocol import RoundRecord

VALIDATION_METRICS = ("val_acc", "val_f1", "val_loss", "val_ppl", "val_exact_match")
PROGRESS = logging.getLogger("lightning_fedpeft.progress")


def write_log_table(trainer: pl.Trainer, filename: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """Rewrite ``<log_dir>/<filename>`` with ``rows`` (columns: every key, in order of first appearance)."""
    if not rows or not trainer.loggers or trainer.log_dir is None:
        return None
    path = Path(trainer.log_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a reader (or a crash) never sees half a table
    return path


class RoundLog:
    """Builds each round's row and keeps the tables written (``rows`` is ``RoundSync.history``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.client_metric_keys: set[str] = set()  # what the algorithms' client halves report (averaged)

    def server_row(
        self, record: RoundRecord, local_losses: Sequence[float], compression: bool, clock: bool
    ) -> dict[str, Any]:
        """The row of a round the server closed."""
        clients = list(record.client_metrics.values())
        losses = [m["train_loss"] for m in clients if "train_loss" in m]
        row: dict[str, Any] = {
            "round": record.round,
            "clients": len(record.received),
            "missing": len(record.missing),
            "train_loss": _mean(losses) if losses else _mean(local_losses),
            "bytes_up": record.bytes_up,
            "bytes_down": record.bytes_down,
        }
        if compression:
            row |= {"wire_bytes_down": record.wire_bytes_down, "wire_bytes_up": record.wire_bytes_up}
        if clock:
            row |= {"sim_round_s": record.sim_round_s, "sim_time_h": record.sim_time_s / 3600.0}
        for key in sorted(self.client_metric_keys):
            values = [m[key] for m in clients if key in m]
            if values:
                row[key] = _mean(values)
        row |= record.metrics
        if record.missing or record.rejected or record.late:
            row["missing_clients"] = " ".join(map(str, record.missing))
            row["rejected_clients"] = " ".join(map(str, record.rejected))
        return row

    @staticmethod
    def client_row(round_idx: int, clients: int, local_losses: Sequence[float]) -> dict[str, Any]:
        """The row a client process keeps (the server keeps the books)."""
        return {
            "round": round_idx,
            "clients": clients,
            "train_loss": _mean(local_losses),
            "bytes_up": 0,
            "bytes_down": 0,
        }

    def add(
        self,
        trainer: pl.Trainer,
        row: dict[str, Any],
        validation: Mapping[str, Any] | None,
        tables: Mapping[str, list[dict[str, Any]]],
        write: bool,
    ) -> None:
        """Append ``row`` (with the global model's ``validation`` metrics, if it was evaluated) and write the
        tables (``rounds.csv`` and the strategy's) when ``write``."""
        for key in VALIDATION_METRICS if validation is not None else ():
            value = validation.get(key)  # type: ignore[union-attr]
            if value is not None:
                row[key] = float(value)
        self.rows.append(row)
        if write:
            write_log_table(trainer, "rounds.csv", self.rows)
            for name, table in tables.items():
                write_log_table(trainer, f"{name}.csv", table)
            if PROGRESS.isEnabledFor(logging.INFO):
                PROGRESS.info(progress_line(self.rows, trainer.max_epochs))

    @staticmethod
    def log_to(pl_module: pl.LightningModule, row: Mapping[str, Any]) -> None:
        """The round's numbers into Lightning's loggers (``metrics.csv``, TensorBoard, ...)."""
        pl_module.log("round", float(row["round"]), on_step=False, on_epoch=True)
        for key in ("train_loss", "bytes_up", "bytes_down", "train_time_s"):
            pl_module.log(f"round_{key}", float(row[key]), on_step=False, on_epoch=True)
        if "sim_time_h" in row:
            pl_module.log("sim_time_h", float(row["sim_time_h"]), on_step=False, on_epoch=True)

    def note_client_metrics(self, keys: Iterable[str]) -> None:
        self.client_metric_keys.update(keys)


def progress_line(rows: Sequence[Mapping[str, Any]], max_rounds: int | None) -> str:
    """The last row as one line: ``round 3/12 | clients 10 | loss 2.134 | val_acc 0.512 | ... | ETA 1m52s``.

    The time left is the mean round time so far times the rounds left until ``max_rounds`` (a run that
    ends on a simulated-time budget may end sooner).
    """
    row = rows[-1]
    done = int(row["round"]) + 1
    parts = [f"round {done}/{max_rounds}" if max_rounds and max_rounds > 0 else f"round {done}"]
    parts.append(f"clients {row['clients']}" + (f" ({row['missing']} missing)" if row.get("missing") else ""))
    if int(row["clients"]) == 0:
        parts.append("NO UPDATE ACCEPTED, global model unchanged")
    parts.append(f"loss {float(row['train_loss']):.4f}")
    parts += [f"{key} {float(row[key]):.4f}" for key in VALIDATION_METRICS if key in row]
    parts.append(f"MB {row['bytes_up'] / 1e6:.2f} up {row['bytes_down'] / 1e6:.2f} down")
    if "sim_time_h" in row:
        parts.append(f"sim {float(row['sim_time_h']):.3f} h")
    if "dp_epsilon" in row:
        parts.append(f"epsilon {float(row['dp_epsilon']):.3g}")
    seconds = [float(r["round_time_s"]) for r in rows if "round_time_s" in r]
    if seconds:
        parts.append(f"{seconds[-1]:.1f} s")
        if max_rounds and max_rounds > done:
            parts.append(f"ETA {_duration(sum(seconds) / len(seconds) * (max_rounds - done))}")
    return " | ".join(parts)


def refusals(record: RoundRecord) -> str:
    """Why the round's participants added nothing: ``client 3: non-finite values; client 5: missing``."""
    reasons = [f"client {c}: {why}" for c, why in sorted(record.rejected.items())]
    reasons += [f"client {c}: missing" for c in record.missing]
    return "; ".join(reasons) or "no participants"


def empty_rounds(rows: Sequence[Mapping[str, Any]]) -> int:
    """How many rounds in a row, up to the last, the server accepted no update in."""
    count = 0
    for row in reversed(rows):
        if int(float(row["clients"])) != 0:
            break
        count += 1
    return count


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
