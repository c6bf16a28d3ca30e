"""FedAdapter against its baselines: simulated hours on Jetson TX2 (1 MB/s) to reach a common accuracy.

Every method trains all-MiniLM-L6-v2 on 20 Newsgroups (64 tokens) split over 100 clients with
Dirichlet(alpha=1) label skew, 5 participants per round (FedAdapter: 5 per trial group), one local epoch,
and logs after every evaluated round its validation accuracy and the simulated clock of the cost model
(TX2 profile, 1 MB/s; see lightning_fedpeft/cost.py). Methods:

* ``fedadapter``: ProgressiveUpgrade from depth 0 / width 8, three trial groups, activation cache;
* ``full``: full fine-tuning FedAvg; ``full_int8``: the same with int8 transfer both ways;
* ``freeze2``: layer freezing, the top 2 layers (and the head) train;
* ``adapter_d2w16`` / ``adapter_d6w32``: fixed adapter configurations (with the activation cache).

Simulated time is what is compared, not rounds. The adapter methods (FedAdapter and the fixed
configurations) all train to the same simulated horizon (``--horizon-h``; their ``--rounds`` are then only
caps), so none of them misses the target for want of time the others had. The full-model baselines, whose
rounds cost minutes of simulated time each, run a fixed number of rounds. The target is 0.99 x the best
validation accuracy any method reaches; the table gives the simulated hours each method needed to reach
it, and the same for a lower target that every method reaches (0.99 x the lowest best accuracy). Where
only one of FedAdapter and a baseline reached a target, the speed-up is a bound: ``>x`` if the baseline
ran ``x`` times FedAdapter's time-to-target without reaching it, ``<x`` the other way round. A second part times one
client's local round with and without the activation cache at depth 1 and 2 (wall clock, this machine),
on MiniLM (6 layers) and MPNet (12 layers, BERT-base scale; the ``mpnet`` packages, see the README), beside
the ratio of the FLOPs each path runs.

A second table gives the hours to several targets (``--target-fractions`` x the best accuracy), and
``--model mpnet`` runs every method on the 12-layer model instead (give it a ``--horizon-h`` of its own;
docs/results.md has the command used). ``--methods`` with no names and ``--reuse FILE`` recomputes the
tables and plot of an earlier run without training.

    python bench/fedadapter.py --out bench/out/fedadapter     # about 65 minutes on 2 CPU cores
    python bench/fedadapter.py --out bench/out/fedadapter_cache --cache-only   # the cache part alone
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import quiet_trainer

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, RoundSync
from lightning_fedpeft.cost import CostModel, count_train_flops
from lightning_fedpeft.fedadapter import ProgressiveUpgrade
from lightning_fedpeft.models import resolve_model_path

METHODS = {
    # name: (module kwargs, RoundSync kwargs)
    "fedadapter": ({"method": "adapter", "depth": 0, "width": 8, "lr": 5e-3, "activation_cache_mb": 4096}, {}),
    "full": ({"method": "full", "lr": 5e-5}, {}),
    "full_int8": ({"method": "full", "lr": 5e-5}, {"compression": "int8"}),
    "freeze2": ({"method": "freeze", "depth": 2, "lr": 1e-4}, {}),
    "adapter_d2w16": ({"method": "adapter", "depth": 2, "width": 16, "lr": 5e-3, "activation_cache_mb": 4096}, {}),
    "adapter_d6w32": ({"method": "adapter", "depth": 6, "width": 32, "lr": 5e-3}, {}),
}
# The methods that train to the common --horizon-h: every adapter method, FedAdapter included.
ADAPTER_METHODS = tuple(name for name, (module_kwargs, _) in METHODS.items() if module_kwargs["method"] == "adapter")


def data_module(args: argparse.Namespace, model: str = "minilm") -> FederatedTextDataModule:
    return FederatedTextDataModule(
        corpus="20NG",
        tokenizer=model,
        max_length=64,
        num_clients=100,
        partitioner="dirichlet",
        alpha=1.0,
        batch_size=16,
        max_val_examples=args.val_examples,
        seed=args.seed,
    )


def run_method(name: str, args: argparse.Namespace) -> dict:
    module_kwargs, sync_kwargs = METHODS[name]
    pl.seed_everything(args.seed, verbose=False)
    data = data_module(args, model=args.model)
    data.setup("fit")
    model = FedPEFTModule(model_name_or_path=args.model, num_labels=data.num_labels, **module_kwargs)
    cost = CostModel("tx2", bandwidth_mbps=args.bandwidth)
    rounds = args.rounds[name]
    # The adapter methods end at the common horizon (RoundSync's simulated-time budget; FedAdapter only
    # at a window's end, so its last window may pass it); the full-model ones after their rounds.
    sync_kwargs = sync_kwargs | ({"max_sim_hours": args.horizon_h} if name in ADAPTER_METHODS else {})
    if name == "fedadapter":
        sync = RoundSync(clients_per_round=5, seed=args.seed, cost_model=cost, eval_every=10**6, **sync_kwargs)
        upgrade = ProgressiveUpgrade(start_depth=args.start_depth, start_width=8, window_rounds=args.window_rounds)
        callbacks = [sync, upgrade]
        limit_val = 0

        # The decided clock, not sync's trial clock (which runs ahead within a window).
        def clock() -> float:
            return upgrade.decisions[-1].sim_time_h if upgrade.decisions else 0.0
    else:
        sync = RoundSync(
            clients_per_round=5, seed=args.seed, cost_model=cost, eval_every=args.eval_every, **sync_kwargs
        )
        callbacks = [sync]
        limit_val = 1.0

        def clock() -> float:  # the cost model's clock after the last round (read once fit is over)
            return float(sync.history[-1]["sim_time_h"]) if sync.history else 0.0

    trainer = quiet_trainer(
        max_epochs=rounds,
        callbacks=callbacks,
        limit_val_batches=limit_val,
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    if name == "fedadapter":
        decisions = upgrade.decisions
        curve = [(d.sim_time_h, d.val_acc) for d in decisions]
        extra = {"decisions": [d.__dict__ for d in decisions]}
    else:
        curve = [(row["sim_time_h"], row["val_acc"]) for row in sync.history if "val_acc" in row]
        extra = {}
    last = sync.history[-1]
    print(
        f"[{name}] {len(sync.history)} rounds, {wall:.0f}s wall, sim {last['sim_time_h']:.3f} h, "
        f"best val_acc {max(a for _, a in curve) if curve else float('nan'):.4f}",
        flush=True,
    )
    return {
        "curve": curve,
        "rounds": len(sync.history),
        "wall_s": wall,
        "round_s": last["sim_round_s"],
        "sim_hours": clock(),
        **extra,
    }


def hours_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((h for h, acc in curve if acc >= target), None)


def hours_run(result: dict) -> float:
    """Simulated hours a method ran (results.json of runs before ``sim_hours`` was kept: the last point's clock)."""
    return result.get("sim_hours", result["curve"][-1][0])


def speedup_cell(mine: float | None, other: float | None, mine_ran: float, other_ran: float) -> str:
    """FedAdapter's speed-up against a baseline at one target: ``other / mine``, or a bound where one side
    never reached it (``>x``: the baseline ran x times FedAdapter's time without arriving)."""
    if mine is not None and other is not None:
        return f"{other / mine:.1f}x"
    if mine is not None:
        return f">{other_ran / mine:.1f}x"
    if other is not None:
        return f"<{other / mine_ran:.1f}x"
    return ""


def target_table(results: dict, fractions: list[float]) -> str:
    """Simulated hours to several targets (``fraction`` x the best accuracy of any method), FedAdapter's
    speed-up beside each baseline's hours.

    One target says little where the curves are close at the top and single evaluations swing by a few
    points: a row of targets shows where along the run FedAdapter gains and loses its lead.
    """
    if "fedadapter" not in results:
        return "(no fedadapter run: no speed-ups to give)"
    best = max(acc for r in results.values() for _, acc in r["curve"])
    others = [name for name in results if name != "fedadapter"]
    lines = [
        "| target | fedadapter (h) | " + " | ".join(f"{n} (h, FedAdapter speed-up)" for n in others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    for f in fractions:
        goal = f * best
        mine = hours_to(results["fedadapter"]["curve"], goal)
        cells = [f"{f:.2f} x best = {goal:.3f}", "not reached" if mine is None else f"{mine:.4f}"]
        for name in others:
            other = hours_to(results[name]["curve"], goal)
            hours = "not reached" if other is None else f"{other:.4f}"
            cell = speedup_cell(mine, other, hours_run(results["fedadapter"]), hours_run(results[name]))
            cells.append(f"{hours} ({cell})" if cell else hours)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cache_ratio(args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    """Wall clock of one client's local round (its batches, forward + backward + step), cached vs not.

    Beside it, the FLOP ratio: the FLOPs autograd runs uncached over those it runs cached (fills aside),
    the speed-up the arithmetic alone allows. The wall clock can beat it a little, because the frozen
    layers the cache skips also run work FlopCounterMode does not count (dropout, softmax, layer norm).
    """
    rows = []
    for name in args.cache_models:
        data = data_module(args, model=name)  # the same client's texts, in this model's tokens
        data.setup("fit")
        sizes = sorted(range(len(data.client_indices)), key=lambda c: -len(data.client_indices[c]))
        client = data.client_indices[sizes[len(sizes) // 2]]  # a median client
        train = data.datasets["train"]
        batches = [data.collate([train[i] for i in client[s : s + 16]]) for s in range(0, len(client), 16)]
        for depth in (1, 2):
            times: dict[str, float | str] = {"model": name, "depth": depth}
            for cached in (False, True):
                torch.manual_seed(0)
                model = FedPEFTModule(
                    model_name_or_path=name,
                    num_labels=data.num_labels,
                    method="adapter",
                    depth=depth,
                    width=8,
                    activation_cache_mb=4096 if cached else None,
                )
                times["layers"] = model.model.config.num_hidden_layers
                opt = model.configure_optimizers()
                flops, _ = count_train_flops(model.model, batches[0], cached=cached, through_lowest_layer=False)
                times["flops_cached" if cached else "flops_uncached"] = flops

                def client_round(
                    model: FedPEFTModule = model, opt: torch.optim.Optimizer = opt, batches: list = batches
                ) -> float:
                    t = time.perf_counter()
                    for batch in batches:
                        loss = model.training_step(batch, 0)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    return time.perf_counter() - t

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.log = lambda *a, **k: None  # training_step logs; there is no Trainer here
                    first = client_round()  # warm-up (and, cached, the cache fill)
                    runs = [client_round() for _ in range(args.repeats)]
                times["cached" if cached else "uncached"] = statistics.median(runs)
                if cached:
                    times["first_round_cached"] = first
            times["ratio"] = times["uncached"] / times["cached"]
            times["flop_ratio"] = times["flops_uncached"] / times["flops_cached"]
            rows.append(times)
            print(f"[cache] {times}", flush=True)
    return rows


def cache_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| model | layers | depth | uncached client round (s) | cached (s) | ratio | FLOP ratio "
        "| first cached round, with fill (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in rows:
        cells = [
            t["model"],
            str(t["layers"]),
            str(t["depth"]),
            f"{t['uncached']:.3f}",
            f"{t['cached']:.3f}",
            f"{t['ratio']:.2f}x",
            f"{t['flop_ratio']:.2f}x",
            f"{t['first_round_cached']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_cache(rows: list[dict[str, float]], out: Path) -> None:
    table = cache_table(rows)
    print("\n" + table)
    (out / "cache.json").write_text(json.dumps(rows, indent=1))
    (out / "cache.md").write_text(table + "\n")
    print(f"wrote {out}/cache.json, cache.md")


def plot(results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, res in results.items():
        if res["curve"]:
            hours, accs = zip(*res["curve"], strict=True)
            ax.plot(hours, accs, marker="o", markersize=3, label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("simulated hours (Jetson TX2, 1 MB/s)")
    ax.set_ylabel("validation accuracy (20 Newsgroups)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/fedadapter")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=list(METHODS),
        help="methods to train; none (with --reuse) only recomputes the tables and plot",
    )
    parser.add_argument(
        "--target-fractions",
        nargs="+",
        type=float,
        default=[0.8, 0.9, 0.95, 0.97, 0.99],
        help="second table: targets as fractions of the best accuracy of any method",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        default="minilm",
        help="model every method trains: a packaged alias (minilm, mpnet) or a local folder; "
        "--horizon-h's default is sized for minilm",
    )
    parser.add_argument("--bandwidth", type=float, default=1.0, help="MB/s")
    parser.add_argument("--val-examples", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--window-rounds", type=float, default=4.0)
    parser.add_argument("--start-depth", type=int, default=0, help="FedAdapter's starting depth (paper: 0, or 1)")
    parser.add_argument("--repeats", type=int, default=3, help="cache timing: timed client rounds per setting")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--cache-only", action="store_true", help="time the activation cache only (cache.md/json)")
    parser.add_argument(
        "--cache-models",
        nargs="+",
        default=["minilm", "mpnet"],
        help="cache timing: packaged models to time (minilm: 6 layers; mpnet: 12 layers, BERT-base scale)",
    )
    parser.add_argument(
        "--reuse",
        help="results.json of an earlier run: its methods that are not in --methods join the table as they are",
    )
    parser.add_argument(
        "--rounds",
        type=json.loads,
        default={
            "fedadapter": 600,
            "full": 16,
            "full_int8": 16,
            "freeze2": 16,
            "adapter_d2w16": 120,
            "adapter_d6w32": 40,
        },
        help="JSON: rounds per method (for the adapter methods a cap; --horizon-h ends them)",
    )
    parser.add_argument(
        "--horizon-h",
        type=float,
        default=0.0135,
        help="simulated hours every adapter method trains for (default: 24 rounds of d6w32, 1.94 s each)",
    )
    args = parser.parse_args()
    if not args.horizon_h > 0:
        parser.error(f"--horizon-h {args.horizon_h}: give a positive number of simulated hours")
    if not args.methods and not (args.reuse or args.cache_only):
        parser.error("--methods is empty: name methods to train, or give --reuse to recompute an earlier run's tables")
    if args.cache_only and args.skip_cache:
        parser.error("--cache-only and --skip-cache contradict each other: give one of them")
    # Every model resolved before any training: a missing package must not cost a run's results.
    timed = [] if args.skip_cache else [("--cache-models", name) for name in args.cache_models]
    for flag, name in [("--model", args.model)] + timed:
        try:
            resolve_model_path(name)
        except ValueError as err:
            parser.error(f"{flag} {name}: {err}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.cache_only:
        write_cache(cache_ratio(args, out), out)
        return
    results = {name: run_method(name, args) for name in args.methods}
    if args.reuse:
        earlier = json.loads(Path(args.reuse).read_text())["results"]
        results = {name: results.get(name) or earlier[name] for name in METHODS if name in results or name in earlier}
    best = max(acc for r in results.values() for _, acc in r["curve"])
    floor = min(max(acc for _, acc in r["curve"]) for r in results.values())
    target, low_target = 0.99 * best, 0.99 * floor
    # Per method: simulated hours to each target (None: not reached) and simulated hours it ran.
    reach = {name: (hours_to(r["curve"], target), hours_to(r["curve"], low_target)) for name, r in results.items()}
    ran_h = {name: hours_run(r) for name, r in results.items()}

    def fmt(h: float | None) -> str:
        return "not reached" if h is None else f"{h:.4f}"

    def speedup(name: str, i: int) -> str:
        if "fedadapter" not in reach or name == "fedadapter":
            return ""
        return speedup_cell(reach["fedadapter"][i], reach[name][i], ran_h["fedadapter"], ran_h[name])

    lines = [
        f"target = 0.99 x best = {target:.4f}; low target = 0.99 x lowest best = {low_target:.4f}",
        "",
        "| method | rounds | best val acc | last round (sim s) | sim hours run | hours to target "
        "| FedAdapter speed-up | hours to low target | FedAdapter speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = [
            name,
            str(r["rounds"]),
            f"{max(a for _, a in r['curve']):.4f}",
            f"{r['round_s']:.2f}",
            f"{ran_h[name]:.4f}",
            fmt(reach[name][0]),
            speedup(name, 0),
            fmt(reach[name][1]),
            speedup(name, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = (
        "\n".join(lines) + "\n\nSimulated hours to several targets:\n\n" + target_table(results, args.target_fractions)
    )
    print(table)
    if not args.skip_cache:
        write_cache(cache_ratio(args, out), out)
    plot(results, target, out / "fedadapter_tta.png")
    (out / "results.json").write_text(json.dumps({"results": results, "target": target}, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out}/results.json, table.md, fedadapter_tta.png")


if __name__ == "__main__":
    main()
