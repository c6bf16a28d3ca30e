"""Robust aggregation and client-level DP: test accuracy with poisoned clients, and accuracy against epsilon.

The federation: all-MiniLM-L6-v2 with adapters in its top 2 layers (width 32; the frozen bottom 4 layers
behind the activation cache), 20 Newsgroups (64 tokens, ``--train-examples`` of its training split) over
10 clients with Dirichlet(1) label skew, all 10 in every round, 5 local steps of batch 16, ``--rounds``
rounds. Each (aggregator, attackers) run is scored on the test split after its last round.

* Attackers: clients 0..k-1 for k in ``--poisoned`` (default 0, 1, 2 of the ten), each sending its
  change sign-flipped and ten times as large (``ScaledUpdateAttack(factor=-10)``): finite, well shaped,
  within the server's change limit, so only the aggregation rule stands against it.
* Aggregators: ``mean`` (FedAvg), ``median`` (coordinate-wise), ``trimmed`` (trim 2 of 10 per side) and
  ``norm`` (each change clipped to ``--max-norm``, then the mean). An honest client's change has an L2
  norm of about 3 here (2.8-3.5 over the first 4 rounds, measured once), hence the default 3.
* DP: FedAvg with ``DPGaussian`` (clip ``--clip-norm``, noise multipliers ``--noise``), no attackers; the
  epsilon at delta 1e-5 after the last round from Opacus' RDP accountant (sampling rate 1: every client
  takes part in every round, so there is no amplification by sampling).

    python bench/robust.py --out bench/out/robust      # about 35 minutes on 2 CPU cores

Prints the table (also ``table.md``), writes ``robust.png`` and ``results.json``. One seed per run.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
from _common import quiet_trainer

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, RoundSync
from lightning_fedpeft.aggregation import Aggregator, CoordinateMedian, DPGaussian, NormBounded, TrimmedMean
from lightning_fedpeft.attacks import ScaledUpdateAttack

CLIENTS = 10
AGGREGATORS = ("mean", "median", "trimmed", "norm")


def aggregator(name: str, args: argparse.Namespace, noise: float | None = None) -> Aggregator | None:
    if noise is not None:
        return DPGaussian(clip_norm=args.clip_norm, noise_multiplier=noise)
    return {
        "mean": lambda: None,
        "median": CoordinateMedian,
        "trimmed": lambda: TrimmedMean(trim=2),
        "norm": lambda: NormBounded(max_norm=args.max_norm),
    }[name]()


def run(name: str, poisoned: int, args: argparse.Namespace, noise: float | None = None) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    data = FederatedTextDataModule(
        corpus="20NG",
        max_length=64,
        num_clients=CLIENTS,
        partitioner="dirichlet",
        alpha=1.0,
        batch_size=16,
        max_train_examples=args.train_examples,
        max_test_examples=args.test_examples,
        max_val_examples=100,
        seed=args.seed,
    )
    data.setup("fit")
    model = FedPEFTModule(num_labels=data.num_labels, depth=2, width=32, lr=5e-3, activation_cache_mb=512)
    rule = aggregator(name, args, noise)
    sync = RoundSync(clients_per_round=CLIENTS, local_steps=5, seed=args.seed, eval_every=args.rounds, aggregator=rule)
    callbacks: list = [sync]
    if poisoned:
        callbacks.append(ScaledUpdateAttack(clients=list(range(poisoned)), factor=args.factor))
    trainer = quiet_trainer(
        max_epochs=args.rounds,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    (test,) = trainer.test(model, datamodule=data, verbose=False)
    result = {
        "aggregator": name if noise is None else f"dp z={noise:g}",
        "poisoned": poisoned,
        "test_acc": float(test["test_acc"]),
        "test_f1": float(test["test_f1"]),
        "seconds": time.perf_counter() - start,
        "clipped_clients": [row.get("clipped_clients") for row in sync.history],
    }
    if isinstance(rule, DPGaussian):
        result |= {"noise_multiplier": noise, "epsilon": rule.epsilon(), "delta": rule.delta}
    print(json.dumps({k: v for k, v in result.items() if k != "clipped_clients"}), flush=True)
    return result


def table(results: list[dict], poisoned: list[int]) -> str:
    lines = ["| aggregator | " + " | ".join(f"{k} poisoned of {CLIENTS}" for k in poisoned) + " |"]
    lines.append("|---|" + "---:|" * len(poisoned))
    for name in AGGREGATORS:
        cells = {r["poisoned"]: r["test_acc"] for r in results if r["aggregator"] == name}
        if cells:
            lines.append(f"| {name} | " + " | ".join(f"{cells[k]:.3f}" if k in cells else "" for k in poisoned) + " |")
    dp = [r for r in results if "epsilon" in r]
    if dp:
        clean = next((r["test_acc"] for r in results if r["aggregator"] == "mean" and r["poisoned"] == 0), None)
        lines += [
            "",
            "| FedAvg with DP | noise multiplier | epsilon (delta 1e-5) | test accuracy |",
            "|---|---:|---:|---:|",
        ]
        if clean is not None:
            lines.append(f"| no DP | 0 | inf | {clean:.3f} |")
        for r in dp:
            lines.append(
                f"| {r['aggregator']} | {r['noise_multiplier']:g} | {r['epsilon']:.3g} | {r['test_acc']:.3f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], poisoned: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in AGGREGATORS:
        points = sorted((r["poisoned"], r["test_acc"]) for r in results if r["aggregator"] == name)
        if points:
            left.plot(*zip(*points, strict=True), marker="o", label=name)
    left.set(xlabel=f"poisoned clients of {CLIENTS} (change x -10)", ylabel="test accuracy", xticks=poisoned)
    left.legend()
    dp = sorted((r["epsilon"], r["test_acc"]) for r in results if "epsilon" in r)
    if dp:
        right.plot(*zip(*dp, strict=True), marker="o", label="FedAvg + DPGaussian")
        clean = [r["test_acc"] for r in results if r["aggregator"] == "mean" and r["poisoned"] == 0]
        if clean:
            right.axhline(clean[0], linestyle="--", color="grey", label="FedAvg, no DP")
        right.set(xscale="log", xlabel="epsilon (delta 1e-5)", ylabel="test accuracy")
        right.legend()
    fig.suptitle("20 Newsgroups, MiniLM adapters, 10 clients per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out/robust")
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    parser.add_argument("--poisoned", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--factor", type=float, default=-10.0, help="what attackers multiply their change by")
    parser.add_argument("--noise", nargs="*", type=float, default=[0.01, 0.1, 1.0], help="DP noise multipliers")
    parser.add_argument("--clip-norm", type=float, default=3.0, help="DP: each client's change is clipped to this")
    parser.add_argument("--max-norm", type=float, default=3.0, help="norm: each client's change is clipped to this")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(name, k, args) for name in args.aggregators for k in args.poisoned]
    results += [run("mean", 0, args, noise) for noise in args.noise]
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    text = table(results, args.poisoned)
    (out / "table.md").write_text(text + "\n")
    plot(results, args.poisoned, out / "robust.png")
    print(text)


if __name__ == "__main__":
    main()
