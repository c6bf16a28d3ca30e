"""What grows with the federation's size: server memory against clients, rounds against ranks, RPC against state.

Three parts, each a set of ``fedpeft fit`` runs in their own processes (2-layer MiniLM, adapters, 10
clients per round, 3 rounds unless said), printed as tables:

* ``clients``: the server's peak RSS with 10 against 1,000 Dirichlet(1) clients of 20 Newsgroups, and 10
  against 10,000 IID clients of CLINC. Clients that never take part must cost nothing: the ratio should
  stay near 1.
* ``ranks``: 100 clients per round (one local step of batch 16 each) over 1, 2 and 3 ranks: seconds
  per round, RPC seconds and MB per round, the server's and the client ranks' peak RSS. On 2 cores, 3
  ranks oversubscribe the CPU: the figure is what such a machine gives, not a scaling law.
* ``state``: the RPC cost of a large trainable state (full fine-tuning of the 2-layer cut: the token
  embeddings alone are 47 MB in float32, about what a decoder LLM's LoRA state weighs) over 2 ranks,
  against the time of the local round; the goal is RPC seconds within a few percent of a round.

Round 0 is a warm-up (not counted); a round's time is ``train_time_s`` in ``rounds.csv``, the median
over the rest. One run per row.

    python bench/scale.py --out docs/data/scale_results.txt   # --parts to choose
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml

BENCH = Path(__file__).resolve().parent


class PeakMemory(pl.Callback):
    """Writes this process's peak RSS (MB) to ``<folder>/rss_rank<R>.json`` at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = int(os.environ.get("RANK", "0"))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
        Path(self.folder, f"rss_rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mb": peak_mb}))


def fit(tmp: Path, name: str, procs: int, data: dict, federation: dict, model: dict | None = None, rounds: int = 3):
    """One run; returns its timed rows (after the warm-up round) and each rank's peak RSS."""
    out = tmp / name
    out.mkdir(parents=True)
    config = {
        "seed_everything": 0,
        "test_after_fit": False,
        "trainer": {
            "max_epochs": rounds + 1,
            "limit_val_batches": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
            "callbacks": [{"class_path": "scale.PeakMemory", "init_args": {"folder": str(out)}}],
        },
        "model": model or {"num_hidden_layers": 2, "method": "adapter", "depth": 2, "width": 32, "lr": 5e-3},
        "data": {"max_length": 64, "batch_size": 16} | data,
        "federation": {"clients_per_round": 10, "local_steps": 5} | federation,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(path)]
    if procs > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"]
    env = dict(os.environ, OMP_NUM_THREADS="1" if procs > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    (rounds_csv,) = out.rglob("rounds.csv")
    with open(rounds_csv) as fh:
        rows = list(csv.DictReader(fh))[1:]
    rss = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["peak_rss_mb"] for p in out.glob("rss_*.json")}
    return rows, rss


def median(rows: list[dict[str, str]], key: str, scale: float = 1.0) -> float:
    return statistics.median(float(r.get(key) or 0) * scale for r in rows)


@functools.cache  # once per corpus and run: the parts that share 20NG need not read its cache again
def tokenize_first(corpus: str) -> None:
    """Fill the tokenized-corpus cache before any measured run: the first run to tokenize a corpus peaks
    higher (the tokenizer's batch over every text) than the runs that read the cache, which once made
    10 clients look 1.7x as costly as 1,000."""
    from lightning_fedpeft.data import FederatedTextDataModule

    FederatedTextDataModule(corpus=corpus, max_length=64, num_clients=10, partitioner="iid").setup()


def clients_part(tmp: Path) -> list[str]:
    lines = ["corpus  clients  server peak RSS MB  ratio to 10 clients"]
    for corpus, many, partitioner in (("20NG", 1000, "dirichlet"), ("clinc", 10000, "iid")):
        tokenize_first(corpus)
        base = None
        for clients in (10, many):
            data = {"corpus": corpus, "num_clients": clients, "partitioner": partitioner, "min_partition_size": 1}
            _, rss = fit(tmp, f"{corpus}_{clients}", 1, data, {"local_steps": 2})
            base = base or rss[0]
            lines.append(f"{corpus:<8}{clients:>7}{rss[0]:>20.0f}{rss[0] / base:>22.2f}")
    return lines


def ranks_part(tmp: Path) -> list[str]:
    lines = ["ranks  s/round  speed-up  RPC s/round  RPC MB/round  server RSS MB  client rank RSS MB"]
    data = {"corpus": "20NG", "num_clients": 200, "partitioner": "iid"}
    tokenize_first("20NG")
    base = None
    for procs in (1, 2, 3):
        rows, rss = fit(tmp, f"ranks{procs}", procs, data, {"clients_per_round": 100, "local_steps": 1})
        seconds = median(rows, "train_time_s")
        base = base or seconds
        mb = median(rows, "rpc_bytes_up", 1e-6) + median(rows, "rpc_bytes_down", 1e-6)
        clients = max((v for k, v in rss.items() if k != 0), default=0.0)
        lines.append(
            f"{procs:>5}{seconds:>9.2f}{base / seconds:>9.2f}x{median(rows, 'rpc_s'):>13.3f}{mb:>14.1f}"
            f"{rss[0]:>15.0f}{clients:>20.0f}"
        )
    return lines


def state_part(tmp: Path) -> list[str]:
    lines = ["trainable state  MB  s/round  RPC s/round  RPC share of the round"]
    data = {"corpus": "20NG", "num_clients": 20, "partitioner": "iid"}
    full = {"num_hidden_layers": 2, "method": "full", "lr": 5e-5}
    tokenize_first("20NG")
    for label, model in (("adapters", None), ("full (2 layers)", full)):
        rows, _ = fit(tmp, f"state_{label.split()[0]}", 2, data, {"clients_per_round": 4, "local_steps": 5}, model)
        seconds, rpc = median(rows, "train_time_s"), median(rows, "rpc_s")
        state_mb = float(rows[0]["bytes_up"]) / int(rows[0]["clients"]) / 1e6
        lines.append(f"{label:<17}{state_mb:>4.1f}{seconds:>9.2f}{rpc:>13.3f}{100 * rpc / seconds:>22.1f}%")
    return lines


PARTS = {"clients": clients_part, "ranks": ranks_part, "state": state_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--out", type=Path, help="also write the tables, with the machine and date, to this file")
    args = parser.parse_args()
    record = [f"# bench/scale.py --parts {' '.join(args.parts)}", f"# {machine()}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            lines = PARTS[part](Path(tmp))
            print("\n".join(lines), end="\n\n", flush=True)
            record += [*lines, ""]
            if args.out:  # written after each part, so a long run keeps what it has measured
                args.out.write_text("\n".join(record))


def machine() -> str:
    """CPU model, core count and date, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"


if __name__ == "__main__":
    main()
