"""FedARA against fixed-rank LoRA and fixed-rank SVD: accuracy, bytes to a common accuracy, step time and memory.

Every method adapts the six linear kinds (query, key, value, attention output, intermediate, output) of
every layer of all-MiniLM-L6-v2 at rank 8, on 20 Newsgroups (64 tokens) split over 100 clients with
Dirichlet(alpha) label skew, 5 clients per round, one local epoch, for each alpha in ``--alphas``:

* ``fedara``: truncated-SVD adapters (peft's AdaLoRA layers) + RankAllocation (budget falls from rank 8 to
  an average of ``--target-rank`` per module) + ModulePruning;
* ``lora``: fixed-rank LoRA FedAvg (FedLoRA), at its own learning rate (``--lora-lr``): LoRA's A starts
  at full scale where the SVD form starts with Λ = 0, and at the SVD methods' 5e-3 it diverges;
* ``svd``: the same SVD adapters at a fixed rank, no allocation.

Reported per (alpha, method): the best and final validation accuracy; the bytes (up + down, all clients)
until the validation accuracy first reaches the common target, 0.99 x the lowest best accuracy among
the methods of that alpha (so every method reaches it); FedARA's saving against LoRA; and, per round,
the median local step time, the peak resident memory of a client's local training, the activation
memory autograd keeps per step, the active ranks and the live modules (fedara only for the last ones).

Every round is scored on the whole 1,000-example dev split by default, so the round that first
reaches a target is exact; a second table gives the ratio at several targets (``--target-fractions``).

    python bench/fedara.py --out bench/out/fedara      # about 80 minutes on 2 CPU cores

Single runs differ by more than the margins they measure, so ``--combine`` reads the ``results.json`` of
runs with other ``--seed`` values (which also change the client partition) and reports each run's
verdict beside the same tables computed on the round-by-round mean over the seeds:

    python bench/fedara.py --combine bench/out/s0/results.json bench/out/s1/results.json --out bench/out/seeds
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import quiet_trainer

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, RoundSync
from lightning_fedpeft.callbacks import ClientResources
from lightning_fedpeft.fedara import ModulePruning, RankAllocation
from lightning_fedpeft.models import DEFAULT_SVD_TARGETS

METHODS = ("fedara", "lora", "svd")


def run(method: str, alpha: float, args: argparse.Namespace) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    data = FederatedTextDataModule(
        corpus="20NG",
        max_length=64,
        num_clients=100,
        partitioner="dirichlet",
        alpha=alpha,
        batch_size=16,
        max_val_examples=args.val_examples,
        min_partition_size=args.min_partition_size,
        seed=args.seed,
    )
    data.setup("fit")
    model = FedPEFTModule(
        num_labels=data.num_labels,
        method="lora" if method == "lora" else "svd",
        rank=args.rank,
        lora_alpha=16,
        target_modules=list(DEFAULT_SVD_TARGETS),
        lr=args.lora_lr if method == "lora" else args.lr,
    )
    sync = RoundSync(clients_per_round=5, seed=args.seed, eval_every=args.eval_every)
    callbacks: list = [sync]
    if method == "fedara":
        callbacks += [
            RankAllocation(
                target_rank=args.target_rank, warmup_rounds=args.warmup_rounds, final_rounds=args.final_rounds
            ),
            ModulePruning(),
        ]
    else:
        callbacks.append(ClientResources())  # the same step-time and memory columns
    trainer = quiet_trainer(
        max_epochs=args.rounds,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    rows = []
    total = 0
    for row in sync.history:
        total += row["bytes_up"] + row["bytes_down"]
        keep = ("round", "val_acc", "step_time_ms", "peak_rss_mb", "saved_activation_mb", "active_ranks")
        rows.append({k: row[k] for k in (*keep, "live_modules", "lowest_live_layer") if k in row} | {"bytes": total})
    accs = [r["val_acc"] for r in rows if "val_acc" in r]
    print(
        f"[alpha={alpha} {method}] {len(rows)} rounds, {wall:.0f}s wall, best val_acc {max(accs):.4f}, "
        f"final {accs[-1]:.4f}, {total / 1e6:.1f} MB",
        flush=True,
    )
    return {"rows": rows, "best": max(accs), "final": accs[-1], "total_bytes": total, "wall_s": wall}


def bytes_to(rows: list[dict], target: float) -> int | None:
    return next((r["bytes"] for r in rows if r.get("val_acc", -1.0) >= target), None)


def mean(rows: list[dict], key: str, part: slice) -> float:
    values = [r[key] for r in rows[part] if key in r]
    return sum(values) / len(values) if values else float("nan")


def end(rows: list[dict], key: str) -> str:
    """The last round's value of ``key`` (only FedARA logs the pruning columns; ``all`` for the others)."""
    return str(int(rows[-1][key])) if key in rows[-1] else "all"


def table(results: dict) -> str:
    lines = [
        "| alpha | method | best val acc | final val acc | target | MB to target | LoRA / this | total MB |"
        " step ms (first 3 → last 3 rounds) | peak RSS MB (first 3 → last 3) | activations MB (first 3 → last 3) |"
        " live modules (end) | lowest live layer (end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for alpha, runs in results.items():
        target = 0.99 * min(r["best"] for r in runs.values())
        lora = bytes_to(runs["lora"]["rows"], target) if "lora" in runs else None
        for method, res in runs.items():
            b = bytes_to(res["rows"], target)
            ratio = f"{lora / b:.2f}x" if (b and lora) else ""
            first, last = slice(0, 3), slice(-3, None)
            rows = res["rows"]
            lines.append(
                f"| {alpha} | {method} | {res['best']:.4f} | {res['final']:.4f} | {target:.4f} | "
                f"{b / 1e6:.1f} | {ratio} | {res['total_bytes'] / 1e6:.1f} | "
                f"{mean(rows, 'step_time_ms', first):.0f} → {mean(rows, 'step_time_ms', last):.0f} | "
                f"{mean(rows, 'peak_rss_mb', first):.0f} → {mean(rows, 'peak_rss_mb', last):.0f} | "
                f"{mean(rows, 'saved_activation_mb', first):.1f} → {mean(rows, 'saved_activation_mb', last):.1f} | "
                f"{end(rows, 'live_modules')} | {end(rows, 'lowest_live_layer')} |"
                if b
                else f"| {alpha} | {method} | {res['best']:.4f} | {res['final']:.4f} | {target:.4f} | not reached | | "
                f"{res['total_bytes'] / 1e6:.1f} | | | | | |"
            )
    return "\n".join(lines)


def target_table(results: dict, fractions: Sequence[float]) -> str:
    """LoRA's bytes over each method's, at several targets (``fraction`` x the lowest best accuracy).

    Single evaluations swing by a few points from round to round, so the round that first crosses one
    target (and the ratio with it) can move a lot between runs; a row of targets shows how much.
    """
    head = " | ".join(f"{f:.2f} x best" for f in fractions)
    lines = [f"| alpha | method | {head} |", "|---|---|" + "---|" * len(fractions)]
    for alpha, runs in results.items():
        if "lora" not in runs:
            continue
        low = min(r["best"] for r in runs.values())
        for method, res in runs.items():
            if method == "lora":
                continue
            cells = []
            for f in fractions:
                mine, lora = bytes_to(res["rows"], f * low), bytes_to(runs["lora"]["rows"], f * low)
                cells.append(
                    f"{lora / 1e6:.1f} / {mine / 1e6:.1f} MB = {lora / mine:.2f}x" if (mine and lora) else "not reached"
                )
            lines.append(f"| {alpha} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_over_seeds(runs_by_seed: Sequence[dict]) -> dict:
    """One results dict whose every (alpha, method) run is the round-by-round mean of the seeds' runs.

    Per alpha, the runs are those of the files that hold that alpha, and only the methods that every one
    of them ran are kept (so both sides of a ratio average the same seeds), cut to the fewest rounds. A
    round's numbers (accuracy, cumulative bytes, step time, ...) are averaged over the seeds that logged
    them; ``best`` and ``final`` are those of the mean curve, not means of each seed's best, so a single
    lucky evaluation cannot set the target.
    """
    merged: dict = {}
    for alpha in sorted({a for r in runs_by_seed for a in r}):
        holding = [r[alpha] for r in runs_by_seed if alpha in r]
        for method in sorted(set.intersection(*(set(h) for h in holding))):
            seeds = [h[method]["rows"] for h in holding]
            rows = []
            for i in range(min(len(s) for s in seeds)):
                row = {}
                for k in sorted({k for s in seeds for k in s[i]}):
                    values = [s[i][k] for s in seeds if k in s[i]]
                    row[k] = sum(values) / len(values)
                rows.append(row)
            accs = [r["val_acc"] for r in rows if "val_acc" in r]
            merged.setdefault(alpha, {})[method] = {
                "rows": rows,
                "best": max(accs),
                "final": accs[-1],
                "total_bytes": rows[-1]["bytes"],
                "seeds": len(seeds),
            }
    return merged


def seed_table(runs_by_seed: Sequence[tuple[str, dict]], goal: float) -> str:
    """Per seed and alpha: both bests, LoRA's bytes over FedARA's at 0.99 x the lower best, and the verdict."""
    lines = [
        "| alpha | run | LoRA best | FedARA best | target | LoRA MB | FedARA MB | LoRA / FedARA | goal met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for alpha in sorted({a for _, r in runs_by_seed for a in r}):
        for name, results in runs_by_seed:
            runs = results.get(alpha, {})
            if not {"lora", "fedara"} <= set(runs):
                continue
            lora, ara = runs["lora"], runs["fedara"]
            target = 0.99 * min(r["best"] for r in runs.values())
            lb, fb = bytes_to(lora["rows"], target), bytes_to(ara["rows"], target)
            ratio = lb / fb if (lb and fb) else float("nan")
            met = ratio >= goal and ara["best"] >= lora["best"]
            lines.append(
                f"| {alpha} | {name} | {lora['best']:.4f} | {ara['best']:.4f} | {target:.4f} | "
                f"{lb / 1e6:.1f} | {fb / 1e6:.1f} | {ratio:.2f}x | {'yes' if met else 'no'} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for alpha, runs in results.items():
        for method, res in runs.items():
            rows = res["rows"]
            evald = [r for r in rows if "val_acc" in r]
            style = "-" if alpha == max(results) else "--"
            label = f"{method}, α={alpha}"
            axes[0].plot([r["bytes"] / 1e6 for r in evald], [r["val_acc"] for r in evald], style, label=label)
            axes[1].plot([r["round"] for r in rows], [r.get("step_time_ms") for r in rows], style, label=label)
            axes[2].plot([r["round"] for r in rows], [r.get("saved_activation_mb") for r in rows], style, label=label)
            axes[3].plot([r["round"] for r in rows], [r.get("peak_rss_mb") for r in rows], style, label=label)
    axes[0].set_xlabel("MB exchanged (up + down, all clients)")
    axes[0].set_ylabel("validation accuracy (20 Newsgroups)")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("median local step (ms, this machine)")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("activation memory per step (MB)")
    axes[3].set_xlabel("round")
    axes[3].set_ylabel("peak RSS of a client's local round (MB)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load(path: Path) -> dict:
    return {float(a): r for a, r in json.loads(path.read_text()).items()}


def combine(paths: Sequence[Path], out: Path, args: argparse.Namespace) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--combine: no such results.json: {', '.join(missing)} (run the bench with --out first)")
    runs = [(str(p.parent.name), load(p)) for p in paths]
    merged = mean_over_seeds([r for _, r in runs])
    if not merged:
        raise SystemExit("--combine: the files hold no run (run the bench with --out first)")
    out.mkdir(parents=True, exist_ok=True)
    text = f"Each run on its own (goal: LoRA / FedARA >= {args.goal}x at equal or better best accuracy):\n\n"
    text += seed_table(runs, args.goal)
    counts = ", ".join(f"alpha {a}: {next(iter(m.values()))['seeds']}" for a, m in merged.items())
    text += f"\n\nThe round-by-round mean over the files that ran each alpha (runs: {counts}):\n\n"
    text += seed_table([("mean", merged)], args.goal) + "\n\n" + table(merged)
    text += "\n\nLoRA MB / this method's MB to reach each target, on the mean curves:\n\n"
    text += target_table(merged, args.target_fractions)
    (out / "seeds.md").write_text(text + "\n")
    (out / "mean_results.json").write_text(json.dumps({str(a): r for a, r in merged.items()}, indent=1))
    plot(merged, out / "fedara_mean.png")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/fedara")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target-rank", type=float, default=1.0)
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--final-rounds", type=int, default=18)
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate of the SVD methods (fedara, svd)")
    parser.add_argument(
        "--lora-lr",
        type=float,
        default=2e-3,
        help="learning rate of fixed-rank LoRA: at 5e-3 it diverges here (best val acc 0.077 at alpha 0.1)",
    )
    parser.add_argument(
        "--val-examples", type=int, default=1000, help="validation examples (1000: the corpus's whole dev split)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=1, help="evaluate every this many rounds (1: the exact round a target is met)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-partition-size", type=int, default=5, help="smallest client (flwr's Dirichlet sampler gives up at 10)"
    )
    parser.add_argument(
        "--target-fractions",
        nargs="+",
        type=float,
        default=[0.95, 0.97, 0.99],
        help="targets of the second table, as fractions of the lowest best accuracy (the first table uses 0.99)",
    )
    parser.add_argument("--reuse", help="a results.json of an earlier run: its finished (alpha, method) runs are kept")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="RESULTS_JSON",
        help="train nothing: read these results.json files (one run per seed) and report each seed's verdict and "
        "the tables of the round-by-round mean over them",
    )
    parser.add_argument("--goal", type=float, default=2.4, help="the LoRA / FedARA bytes ratio the issue asks for")
    args = parser.parse_args()
    out = Path(args.out)
    if args.combine:
        combine([Path(p) for p in args.combine], out, args)
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {}
    if args.reuse:  # finished runs of an earlier (perhaps interrupted) invocation are kept, not re-run
        results = load(Path(args.reuse))
    for alpha in args.alphas:
        for method in args.methods:
            if method in results.get(alpha, {}):
                print(f"[alpha={alpha} {method}] reused from {args.reuse}", flush=True)
                continue
            results.setdefault(alpha, {})[method] = run(method, alpha, args)
            (out / "results.json").write_text(json.dumps({str(a): r for a, r in results.items()}, indent=1))
    text = table(results) + "\n\nLoRA MB / this method's MB to reach each target:\n\n"
    text += target_table(results, args.target_fractions)
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "fedara.png")
    print(text)


if __name__ == "__main__":
    main()
