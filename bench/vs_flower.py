"""The same federated fine-tune with this package and with Flower's simulation engine, side by side.

The work (the issue's): all-MiniLM-L6-v2 with bottleneck adapters in its top 2 layers (width 32),
20 Newsgroups at 128 tokens over 100 clients with Dirichlet(1) label skew (the same partition on every
side: ``FederatedTextDataModule.client_indices``, seed 42), 10 clients per round, 5 local steps of batch
16 with a fresh AdamW (lr 5e-3) per client, sample-weighted FedAvg over the same trainable parameters
(adapters and head, 0.1 M). Accuracy is measured on the same 500 validation texts after the last round.

Sides (``--sides``; each runs in its own process tree, one after another):

* ``ours``: ``fedpeft fit``, one process, the activation cache off (``model.activation_cache_mb: null``);
* ``ours_cache``: the same with the defaults, so the activation cache on (``auto``: 1024 MiB, float16);
* ``ours_cache_fp32``: the cache storing float32 (to check float16 storage costs no accuracy);
* ``ours_2proc``: the defaults under ``torchrun --nproc-per-node=2`` (one thread per process);
* ``flower_AxT``: Flower's simulation engine (Ray backend), ``A`` actors of ``T`` threads each. Its
  client is a plain PyTorch loop over the same model and the client's partition; each actor builds the
  model and reads the tokenized corpus once and keeps them across calls (the fastest honest way; a
  client that rebuilt the model on every call would be slower). The server's FedAvg samples 10 of the
  100 nodes per round itself, so Flower's clients per round differ from ours (the partition does not).

Per side: seconds per round (median over the rounds after the first, which is a warm-up: the first
Flower round includes its actors' start), the whole run's wall clock, the peak of the summed PSS
(proportional set size, so shared pages count once) of every process of the side's tree, sampled each
second, and validation accuracy after the last round. Ratios are against the fastest Flower side.

    pip install -e '.[bench]'                   # Flower 1.x with its Ray simulation engine
    python bench/vs_flower.py --out bench/out/vs_flower     # real 26m55s on 2 CPU cores

Writes ``table.md`` and ``results.json`` to ``--out``. One run per side, one seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

SEED = 42
CLIENTS = 100
PER_ROUND = 10
LOCAL_STEPS = 5
BATCH = 16
LR = 5e-3
DEPTH = 2
WIDTH = 32
VAL_EXAMPLES = 500
OURS_SIDES = {
    "ours": ({"activation_cache_mb": None}, 1),
    "ours_cache": ({}, 1),
    "ours_cache_fp32": ({"activation_cache_dtype": "float32"}, 1),
    "ours_2proc": ({}, 2),
}


def data_settings(args: argparse.Namespace) -> dict:
    return {
        "corpus": "20NG",
        "max_length": args.max_length,
        "num_clients": CLIENTS,
        "partitioner": "dirichlet",
        "alpha": 1.0,
        "batch_size": BATCH,
        "max_val_examples": VAL_EXAMPLES,
        "seed": SEED,
    }


def model_settings(args: argparse.Namespace) -> dict:
    settings = {"method": "adapter", "depth": DEPTH, "width": WIDTH, "lr": LR, "optimizer": "adamw"}
    if args.layers:
        settings["num_hidden_layers"] = args.layers
    return settings


# -- measuring a process tree --------------------------------------------------------------------------
def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemory:
    """Samples the summed PSS of a process and all its descendants once a second; keeps the peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                pids = [self.root.pid] + [p.pid for p in self.root.children(recursive=True)]
            except psutil.Error:
                pids = []
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(pid) for pid in pids))
            self._stop.wait(1.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_tree(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak summed PSS in MB). Exits with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        memory = TreeMemory(proc.pid)
        code = proc.wait()
        peak = memory.stop()
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{' '.join(cmd[:6])} failed (exit {code}):\n{log_path.read_text()[-4000:]}")
    return wall, peak


# -- our sides -----------------------------------------------------------------------------------------
def run_ours(tmp: Path, side: str, args: argparse.Namespace) -> dict:
    extra, procs = OURS_SIDES[side]
    out = tmp / side
    config = {
        "seed_everything": SEED,
        "test_after_fit": False,
        "trainer": {
            "max_epochs": args.rounds,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
        },
        "model": model_settings(args) | extra,
        "data": data_settings(args),
        "federation": {
            "clients_per_round": PER_ROUND,
            "local_steps": LOCAL_STEPS,
            "eval_every": args.rounds,
            "seed": SEED,
        },
    }
    path = tmp / f"{side}.yaml"
    path.write_text(yaml.safe_dump(config))
    fit = ["-m", "lightning_fedpeft", "fit", "--config", str(path)]
    cmd = [sys.executable, *fit]
    threads = "2"
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *fit]
        threads = "1"
    wall, peak = run_tree(cmd, dict(os.environ, OMP_NUM_THREADS=threads), tmp / f"{side}.log")
    (rounds_csv,) = out.rglob("rounds.csv")
    with open(rounds_csv) as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    return {
        "side": side,
        "round_seconds": [float(r["train_time_s"]) for r in rows],
        "wall_s": wall,
        "peak_pss_mb": peak,
        "val_acc": float(last["val_acc"]),
    }


# -- Flower's side -------------------------------------------------------------------------------------
def run_flower(tmp: Path, side: str, args: argparse.Namespace) -> dict:
    actors, threads = (int(x) for x in side.removeprefix("flower_").split("x"))
    result_path = tmp / f"{side}.json"
    cmd = [
        sys.executable,
        __file__,
        "--flower-worker",
        str(result_path),
        "--actors",
        str(actors),
        "--threads",
        str(threads),
        "--rounds",
        str(args.rounds),
        "--max-length",
        str(args.max_length),
    ]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    wall, peak = run_tree(cmd, dict(os.environ, OMP_NUM_THREADS=str(threads)), tmp / f"{side}.log")
    worker = json.loads(result_path.read_text())
    return {"side": side, "wall_s": wall, "peak_pss_mb": peak} | worker


def flower_worker(args: argparse.Namespace) -> None:
    """Runs in its own process: Flower's simulation of the same work; writes the round times and accuracy."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule
    from lightning_fedpeft.rounds import client_batches, client_seed

    def build() -> tuple[FederatedTextDataModule, torch.nn.Module]:
        torch.manual_seed(SEED)  # seeded initial adapters and head (every actor builds the same model)
        data = FederatedTextDataModule(**data_settings(args))
        data.setup("fit")
        module = FedPEFTModule(num_labels=data.num_labels, **model_settings(args), activation_cache_mb=None)
        return data, module.model

    def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    actor_state: dict = {}  # one per actor process: the model and data, built at its first call

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(args.threads)
        if not actor_state:
            actor_state["data"], actor_state["model"] = build()
        data, model = actor_state["data"], actor_state["model"]
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        model.train()
        client = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        indices = data.client_indices[client]
        # The batches our RoundSync would lay out for this client: the same function and seeding.
        generator = torch.Generator().manual_seed(client_seed(SEED, server_round, client))
        batches = client_batches(indices, BATCH, local_steps=LOCAL_STEPS, generator=generator)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        dataset = data.train_dataset
        for batch_indices in batches:
            loss = model(**data.collate([dataset[i] for i in batch_indices])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        reply = RecordDict(
            {
                "arrays": ArrayRecord(trainable(model)),
                "metrics": MetricRecord({"num-examples": len(indices), "train_loss": float(loss)}),
            }
        )
        return Message(content=reply, reply_to=msg)

    server_app = ServerApp()
    times: list[float] = []
    accuracy: dict[str, float] = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        data, model = build()
        val = data.val_dataloader()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            times.append(time.perf_counter())
            if server_round != args.rounds:
                return None
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            model.eval()
            right = total = 0
            with torch.no_grad():
                for batch in val:
                    logits = model(**batch).logits
                    right += int((logits.argmax(-1) == batch["labels"]).sum())
                    total += len(batch["labels"])
            accuracy["val_acc"] = right / total
            return MetricRecord({"val_acc": right / total})

        strategy = FedAvg(
            fraction_train=PER_ROUND / CLIENTS,
            min_train_nodes=PER_ROUND,
            fraction_evaluate=0.0,
            min_evaluate_nodes=0,
            min_available_nodes=CLIENTS,
        )
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(trainable(model)), num_rounds=args.rounds, evaluate_fn=evaluate
        )

    backend = {
        "client_resources": {"num_cpus": args.threads, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.actors * args.threads, "include_dashboard": False},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS, backend_config=backend)
    rounds = [b - a for a, b in zip(times, times[1:], strict=False)]
    Path(args.flower_worker).write_text(json.dumps({"round_seconds": rounds, **accuracy}))


# -- the table -----------------------------------------------------------------------------------------
def table(results: list[dict], args: argparse.Namespace) -> str:
    for r in results:
        timed = r["round_seconds"][1:] or r["round_seconds"]
        r["s_per_round"] = statistics.median(timed)
        r["s_last5"] = statistics.median(timed[-5:])  # where the activation cache has filled most
    flower = [r for r in results if r["side"].startswith("flower")]
    base = min(flower, key=lambda r: r["s_per_round"]) if flower else None
    lines = [
        f"MiniLM adapters d{DEPTH}w{WIDTH}, 20NG {args.max_length} tokens, {CLIENTS} Dirichlet(1) clients, "
        f"{PER_ROUND}/round, {LOCAL_STEPS} steps of batch {BATCH}; {args.rounds} rounds, s/round = median of "
        f"rounds 2..{args.rounds}; accuracy on {VAL_EXAMPLES} validation texts after round {args.rounds}"
        + (f"; baseline {base['side']}" if base else ""),
        "",
        "| side | s/round | speed-up vs Flower | last 5 rounds: s/round | speed-up | run wall s "
        "| peak PSS MB, all processes | vs Flower | val acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speed = f"{base['s_per_round'] / r['s_per_round']:.2f}x" if base else ""
        late = f"{base['s_last5'] / r['s_last5']:.2f}x" if base else ""
        memory = f"{r['peak_pss_mb'] / base['peak_pss_mb']:.2f}x" if base else ""
        lines.append(
            f"| {r['side']} | {r['s_per_round']:.2f} | {speed} | {r['s_last5']:.2f} | {late} | {r['wall_s']:.0f} | "
            f"{r['peak_pss_mb']:.0f} | "
            f"{memory} | {r['val_acc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out/vs_flower")
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "ours_cache", "ours_cache_fp32", "ours_2proc", "flower_2x1", "flower_1x2"],
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side (the first is a warm-up)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers (a quick check; >= 2)")
    parser.add_argument("--table", default=None, help="only rebuild the table from a results.json (with --rounds)")
    parser.add_argument("--flower-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_worker:
        flower_worker(args)
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text()), args))
        return
    for side in args.sides:
        if side not in OURS_SIDES and not (side.startswith("flower_") and "x" in side):
            parser.error(f"--sides: unknown side {side!r}; ours sides: {', '.join(OURS_SIDES)}; Flower: flower_AxT")
    if any(s.startswith("flower_") for s in args.sides):
        try:
            import flwr  # noqa: F401
        except ImportError:
            sys.exit("Flower is not installed: pip install -e '.[bench]' (or drop the flower_* sides)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            run = run_flower if side.startswith("flower_") else run_ours
            result = run(Path(tmp), side, args)
            print(json.dumps(result), flush=True)
            results.append(result)
    text = table(results, args)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
