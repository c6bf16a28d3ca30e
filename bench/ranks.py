"""Rounds per second with 1 and 2 processes on the same simulated federated work, plus RPC cost per round.

Each side runs ``fedpeft fit`` (the 2-process side under ``torchrun --standalone``) on the same
config: MiniLM with adapters, the same clients per round and local steps, no validation. Round 0 is a
warm-up and is not counted; the time of a round is from its opening to its aggregation (``train_time_s``
in ``rounds.csv``). RPC seconds are the client ranks' time in transfers that carried data; RPC bytes
are the tensors that crossed the wire (rank 0's own clients use none).

    python bench/ranks.py                 # --help for the knobs
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def run(tmp: Path, name: str, procs: int, threads: int, args: argparse.Namespace) -> list[dict[str, str]]:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": args.rounds + 1,
            "limit_val_batches": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / name)}},
        },
        "model": {"method": "adapter", "depth": 6, "width": 32, "lr": 5e-3},
        "data": {"corpus": args.corpus, "num_clients": 20, "max_length": args.max_length, "partitioner": "iid"},
        "federation": {"clients_per_round": args.clients_per_round, "local_steps": args.local_steps},
        "test_after_fit": False,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    fit = ["-m", "lightning_fedpeft", "fit", "--config", str(path)]
    cmd = [sys.executable, *fit]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *fit]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    (rounds,) = (tmp / name).rglob("rounds.csv")
    with open(rounds) as fh:
        return list(csv.DictReader(fh))[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="20NG")
    parser.add_argument("--clients-per-round", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    sides = [("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1), ("1 process x 2 threads", 1, 2)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, procs, threads) in enumerate(sides):
            rows = run(Path(tmp), f"side{i}", procs, threads, args)
            seconds = statistics.median(float(r["train_time_s"]) for r in rows)
            rpc_s = statistics.median(float(r.get("rpc_s") or 0) for r in rows)
            rpc_mb = statistics.median(
                (float(r.get("rpc_bytes_up") or 0) + float(r.get("rpc_bytes_down") or 0)) / 1e6 for r in rows
            )
            results.append((label, seconds, rpc_s, rpc_mb))
    steps = args.clients_per_round * args.local_steps
    print(
        f"round = {args.clients_per_round} clients x {args.local_steps} local steps on {args.corpus} "
        f"(MiniLM adapters, {args.max_length} tokens, batch 16), median of {args.rounds} rounds after a warm-up"
    )
    base = results[0][1]
    print(f"{'side':<26}{'s/round':>9}{'rounds/s':>10}{'speed-up':>10}{'RPC s/round':>13}{'RPC MB/round':>14}")
    for label, seconds, rpc_s, rpc_mb in results:
        print(f"{label:<26}{seconds:>9.2f}{1 / seconds:>10.3f}{base / seconds:>9.2f}x{rpc_s:>13.3f}{rpc_mb:>14.2f}")
    print(f"({steps} local steps per round in every side)")


if __name__ == "__main__":
    main()
