"""A mixed fleet: simulated hours to a common accuracy for fleet-aware methods and their uniform baselines.

100 clients of 20 Newsgroups (MiniLM, 64 tokens) with Dirichlet(alpha) label skew, 10 per round, on a fleet
of half Raspberry Pi 4B, 30% Jetson Orin Nano and 20% Jetson TX2 (``resources/devices.yaml``; dealt from the
seed), every client timed on its own device by the cost model (a round lasts as long as its slowest client):

* ``a_uniform_small``: adapters (depth 2, width 16) on every client, the cheap configuration the weakest
  device keeps up with (the activation cache serves the frozen bottom, as in bench/fedadapter.py);
* ``b_uniform_large``: LoRA rank 8 on all six linear kinds of every layer, every client; stragglers set the pace;
* ``b_adapters_large``: adapters (depth 6, width 32: every layer) on every client, the large fixed adapter
  configuration of bench/fedadapter.py; with a and e it is what goal 2 compares FedAdapter against;
* ``c_hetlora_zero_pad``: LoRA with rank 2 on the Raspberry Pis and 8 on the Jetsons, HetLoRA's zero-padding;
* ``c_hetlora_exact``: the same ranks, every coordinate averaged over the clients that trained it (ours);
* ``d_fedara_fleet``: FedARA (SVD rank 8, target rank 1) with every client's nested prefix sized to its device;
* ``e_fedadapter_fleet``: FedAdapter (from depth 0, width 8) with trial groups drawn within device classes
  and every client's depth sized to its device;
* ``f_depth_ranks``: FedAdapter x FedARA (``DepthRankUpgrade``): SVD adapters (rank 8) grown in depth from the
  top layer by trial groups, their ranks allocated down to 1 per module by the winner's importance; every
  client trains the top layers of the trial's depth that its device and the round's budget allow.

Every run stops at ``--max-sim-hours`` on the simulated clock (or ``--rounds``). Reported per alpha: the best
and final validation accuracy, the simulated hours to the common target (``--target-fraction`` x the lowest
best accuracy of the alpha's methods, so every method reaches it) and how many times sooner the fleet-aware
methods (d, e, f) reach it than the best of the baselines (a-c). Goals (issue 32): d or f >= 1.5x the best of
a-c at >= its best accuracy, at both alphas; e (FedAdapter) >= 2x the best fixed adapter configuration in
hindsight (the faster of a and ``b_adapters_large`` to the target; a table of its own). ``--seeds`` runs
each (alpha, method) per seed (the seed also changes the partition and the fleet). ``table.md`` gives each
seed's figures, then per alpha and method their summary over the seeds: mean best accuracy, the speed-up's
geometric mean and on how many seeds goal 1 held.
``--target-over`` sets the target from some methods only, so seeds that ran different methods share one rule.
``--horizon-h`` reads every run only up to that simulated hour (its best and final accuracy too), so runs
capped differently (by rounds or by simulated hours) are compared over the same simulated time.

    python bench/fleet.py --out bench/out/fleet                       # hours on 2 CPU cores: see docs/results.md
    python bench/fleet.py --tiny --out /tmp/fleet_tiny                # a 2-layer smoke run in about a minute

``--from-results A.json B.json`` re-tabulates and re-plots runs saved by earlier invocations (for instance the
baselines and the fleet-aware methods run apart) without training anything; the target is recomputed over all.
Every run also writes its rounds so far after each round to ``progress_<alpha>_<seed>_<method>.json`` in
``--out`` (marked partial), so a run stopped by hand can be read the same way; the table names it with the
simulated hour it reached.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
from _common import quiet_trainer

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, HeterogeneousLoRA, RoundSync
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.depth_ranks import DepthRankUpgrade
from lightning_fedpeft.fedadapter import ProgressiveUpgrade
from lightning_fedpeft.fedara import ModulePruning, RankAllocation
from lightning_fedpeft.fleet import Fleet
from lightning_fedpeft.models import DEFAULT_SVD_TARGETS

FLEET = {"rpi4b": 0.5, "orin_nano": 0.3, "tx2": 0.2}
METHODS = (
    "a_uniform_small",
    "b_uniform_large",
    "b_adapters_large",
    "c_hetlora_zero_pad",
    "c_hetlora_exact",
    "d_fedara_fleet",
    "e_fedadapter_fleet",
    "f_depth_ranks",
)
BASELINES = ("a_uniform_small", "b_uniform_large", "b_adapters_large", "c_hetlora_zero_pad", "c_hetlora_exact")
FIXED_ADAPTERS = ("a_uniform_small", "b_adapters_large")  # goal 2: FedAdapter against these, in hindsight
FLEET_AWARE = ("d_fedara_fleet", "e_fedadapter_fleet", "f_depth_ranks")


KEPT = (
    "round",
    "val_acc",
    "sim_time_h",
    "sim_round_s",
    "pred_saved_s",
    "mean_client_triplets",
    "mean_train_depth",
    "trial_depth",
    "live_modules",
    "active_ranks",
)


def saved_run(history: list[dict]) -> dict | None:
    """A run as ``results.json`` keeps it: the columns of its rows that the tables and the plot read, and its
    best and final validation accuracy (None before its first validation)."""
    rows = [{k: row[k] for k in KEPT if k in row} for row in history]
    accs = [r["val_acc"] for r in rows if "val_acc" in r]
    return {"rows": rows, "best": max(accs), "final": accs[-1]} if accs else None


class SaveProgress(pl.Callback):
    """After every round, the run so far in ``results.json``'s format, marked ``"partial": true``.

    A long run stopped by hand (or cut off) so keeps its rounds; ``--from-results`` reads the file like any
    other, and the table names such a run with the simulated hour it reached (``shown_name``).
    """

    def __init__(self, sync: RoundSync, path: Path, key: str, method: str) -> None:
        self.sync, self.path, self.key, self.method = sync, path, key, method

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run's last round is closed at the end of fit (RoundSync's on_train_end runs before this one).
        self._write()

    def _write(self) -> None:
        run = saved_run(self.sync.history)
        if run is not None:
            self.path.write_text(json.dumps({self.key: {self.method: run | {"partial": True}}}, indent=1))


def run(method: str, alpha: float, seed: int, args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = FederatedTextDataModule(
        corpus=args.corpus,
        max_length=args.max_length,
        num_clients=args.num_clients,
        partitioner="dirichlet",
        alpha=alpha,
        batch_size=16,
        max_train_examples=args.max_train_examples,
        max_val_examples=args.val_examples,
        min_partition_size=args.min_partition_size,
        seed=seed,
    )
    data.setup("fit")
    layers = {"num_labels": data.num_labels} | ({"num_hidden_layers": args.layers} if args.layers else {})
    svd_like = {"rank": 8, "lora_alpha": 16, "target_modules": list(DEFAULT_SVD_TARGETS)}
    cost = CostModel(bandwidth_mbps=args.bandwidth_mbps, fleet=Fleet(fractions=FLEET))
    callbacks: list = []
    if method == "a_uniform_small":
        model = FedPEFTModule(method="adapter", depth=2, width=16, lr=args.adapter_lr, **layers)
    elif method == "b_uniform_large":
        model = FedPEFTModule(method="lora", lr=args.lora_lr, **svd_like, **layers)
    elif method == "b_adapters_large":
        model = FedPEFTModule(method="adapter", depth=args.layers or 6, width=32, lr=args.adapter_lr, **layers)
    elif method.startswith("c_hetlora"):
        model = FedPEFTModule(method="lora", lr=args.lora_lr, **svd_like, **layers)
        rule = "zero_pad" if method.endswith("zero_pad") else "per_coordinate"
        callbacks.append(HeterogeneousLoRA(ranks={"rpi4b": 2, "orin_nano": 8, "tx2": 8}, rule=rule))
    elif method == "d_fedara_fleet":
        model = FedPEFTModule(method="svd", lr=args.lr, **svd_like, **layers)
        callbacks += [RankAllocation(target_rank=1.0, total_rounds=args.rounds, warmup_rounds=2, final_rounds=2)]
        callbacks.append(ModulePruning())
    elif method == "e_fedadapter_fleet":
        model = FedPEFTModule(method="adapter", depth=0, width=8, lr=args.adapter_lr, **layers)
        callbacks.append(ProgressiveUpgrade(start_depth=0, start_width=8, max_val_batches=args.trial_val_batches))
    elif method == "f_depth_ranks":
        model = FedPEFTModule(method="svd", lr=args.lr, **svd_like, **layers)
        callbacks.append(DepthRankUpgrade(start_depth=1, target_rank=1.0, max_val_batches=args.trial_val_batches))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    sync = RoundSync(
        clients_per_round=args.clients_per_round,
        seed=seed,
        eval_every=args.eval_every,
        cost_model=cost,
        max_sim_hours=args.max_sim_hours,
    )
    progress = SaveProgress(sync, args.out / f"progress_{alpha}_{seed}_{method}.json", f"{alpha}/{seed}", method)
    trainer = quiet_trainer(max_epochs=args.rounds, callbacks=[sync, *callbacks, progress])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    saved = saved_run(sync.history)
    assert saved is not None, "RoundSync validates the run's last round"
    rows = saved["rows"]
    print(
        f"[alpha={alpha} seed={seed} {method}] {len(rows)} rounds, {rows[-1]['sim_time_h']:.3f} sim h, {wall:.0f}s "
        f"wall, best val_acc {saved['best']:.4f}, final {saved['final']:.4f}",
        flush=True,
    )
    return saved | {"wall_s": wall}


def hours_to(rows: list[dict], target: float) -> float | None:
    """The earliest simulated hour at which a validated model reached ``target`` (``None``: never).

    The earliest, not the first row's: a trial-group method's (e, f) rows carry each trial group's own clock,
    which restarts at its window's start, because the groups of a window train side by side on different
    participants. A later group's row can so be earlier in simulated time; at that hour the federation held
    that group's model. For every other method the clock only grows and the two readings agree.
    """
    return min((r["sim_time_h"] for r in rows if r.get("val_acc", -1.0) >= target), default=None)


def target_of(runs: dict, fraction: float, over: list[str] | None) -> float:
    """``fraction`` x the lowest best accuracy of ``over`` (default: every method of this alpha and seed).

    ``over`` keeps the target on the same methods for every seed where some seeds ran fewer methods.
    """
    chosen = [r["best"] for m, r in runs.items() if not over or m in over]
    if not chosen:
        raise SystemExit(f"--target-over {' '.join(over or [])}: none of these methods ran; ran: {', '.join(runs)}")
    return fraction * min(chosen)


def per_seed(runs: dict, fraction: float, over: list[str] | None) -> dict:
    """One alpha and seed: the target, and per method its hours to it and the speed-up over the best baseline."""
    target = target_of(runs, fraction, over)
    hours = {m: hours_to(r["rows"], target) for m, r in runs.items()}
    base = [h for m, h in hours.items() if m in BASELINES and h is not None]
    best_base = min(base) if base else None
    base_acc = max((r["best"] for m, r in runs.items() if m in BASELINES), default=None)
    out = {"target": target, "methods": {}}
    for method, res in runs.items():
        h = hours[method]
        ratio = best_base / h if (h and best_base and method in FLEET_AWARE) else None
        # Goal 1 of issue 32, on this seed: >= 1.5x sooner than the best baseline, at >= the baselines' best.
        goal = None if ratio is None or base_acc is None else (ratio >= 1.5 and res["best"] >= base_acc)
        out["methods"][method] = {"best": res["best"], "final": res["final"], "hours": h, "ratio": ratio, "goal": goal}
    return out


def within(results: dict, horizon_h: float | None) -> dict:
    """Every run read only up to ``horizon_h`` simulated hours: its rows, best and final accuracy.

    A run that validated nothing by then is left out of its seed (and said so). ``None``: unchanged.
    """
    if horizon_h is None:
        return results
    kept: dict = {}
    for key, runs in results.items():
        for method, res in runs.items():
            rows = [r for r in res["rows"] if r["sim_time_h"] <= horizon_h]
            accs = [r["val_acc"] for r in rows if "val_acc" in r]
            if not accs:
                print(f"[{key} {method}] validated nothing by {horizon_h} simulated h: left out", flush=True)
                continue
            # A run saved part-way that got past the horizon is whole within it.
            partial = bool(res.get("partial")) and max(r["sim_time_h"] for r in res["rows"]) <= horizon_h
            kept.setdefault(key, {})[method] = {
                **res,
                "rows": rows,
                "best": max(accs),
                "final": accs[-1],
                "partial": partial,
            }
    return kept


def adapter_lead(results: dict, fraction: float, over: list[str] | None = None) -> str:
    """Goal 2 per (alpha, seed): FedAdapter's (e) hours to the target against the best fixed adapter
    configuration in hindsight (the one of ``FIXED_ADAPTERS`` that reached it soonest). ``""`` where no seed
    ran e beside a fixed configuration."""
    lines = []
    for key, runs in results.items():
        if "e_fedadapter_fleet" not in runs or not any(m in runs for m in FIXED_ADAPTERS):
            continue
        alpha, seed = key.split("/")
        figures = per_seed(runs, fraction, over)
        hours = {m: f["hours"] for m, f in figures["methods"].items()}
        fixed = [(hours[m], m) for m in FIXED_ADAPTERS if m in hours and hours[m] is not None]
        mine = hours["e_fedadapter_fleet"]
        best_h, best_m = min(fixed) if fixed else (None, "none reached it")
        lead, goal = "", "not met (e did not reach it)" if mine is None else ""
        if mine and best_h:
            lead, goal = f"{best_h / mine:.2f}x", "met" if best_h / mine >= 2.0 else "not met"
        show = [f"{h:.3f}" if h is not None else "not reached" for h in (mine, best_h)]
        lines.append(
            f"| {alpha} | {seed} | {figures['target']:.4f} | {show[0]} | {best_m} | {show[1]} | {lead} | {goal} |"
        )
    if not lines:
        return ""
    header = "| alpha | seed | target | e: sim h | best fixed adapters | its sim h | lead (fixed / e) | goal 2 |"
    return "\n".join([header, "|---|---|---|---|---|---|---|---|", *lines])


def shown_name(method: str, res: dict) -> str:
    """The method, and for a run saved part-way (``SaveProgress``) the simulated hour it had reached."""
    if not res.get("partial"):
        return method
    return f"{method} (stopped at {max(r['sim_time_h'] for r in res['rows']):.3f} h)"


def table(results: dict, fraction: float, over: list[str] | None = None) -> str:
    """Per (alpha, seed, method): accuracies, sim hours to the target, and the fleet-aware speed-ups."""
    lines = [
        "| alpha | seed | method | best val acc | final val acc | target | sim h to target | best baseline / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        alpha, seed = key.split("/")
        figures = per_seed(runs, fraction, over)
        for method, f in figures["methods"].items():
            ratio = f"{f['ratio']:.2f}x" if f["ratio"] is not None else ""
            shown = f"{f['hours']:.3f}" if f["hours"] is not None else "not reached"
            lines.append(
                f"| {alpha} | {seed} | {shown_name(method, runs[method])} | {f['best']:.4f} | {f['final']:.4f} | "
                f"{figures['target']:.4f} | {shown} | {ratio} |"
            )
    return "\n".join(lines)


def summary(results: dict, fraction: float, over: list[str] | None = None) -> str:
    """Per alpha and method, over the seeds it ran: mean best accuracy (min-max), the speed-up's geometric
    mean (for ratios: the geometric mean of the inverses is the inverse of the geometric mean, so the figure
    does not depend on which way the ratio is taken) and on how many seeds goal 1 held. Each seed's figures
    use that seed's own target and baselines, as in ``table``."""
    by_alpha: dict[str, dict[str, list[dict]]] = {}
    for key, runs in results.items():
        alpha, _ = key.split("/")
        for method, f in per_seed(runs, fraction, over)["methods"].items():
            by_alpha.setdefault(alpha, {}).setdefault(method, []).append(f)
    lines = [
        "| alpha | method | seeds | best val acc: mean (min-max) | sim h to target: mean | "
        "best baseline / this: geometric mean (per seed) | goal 1 met |",
        "|---|---|---|---|---|---|---|",
    ]
    for alpha, methods in by_alpha.items():
        for method, seeds in methods.items():
            bests = [f["best"] for f in seeds]
            reached = [f["hours"] for f in seeds if f["hours"] is not None]
            hours = f"{sum(reached) / len(reached):.3f}" if reached else "not reached"
            if len(reached) < len(seeds):
                hours += f" ({len(reached)} of {len(seeds)} reached)"
            ratios = [f["ratio"] for f in seeds if f["ratio"] is not None]
            ratio, goal = "", ""
            if ratios:
                geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
                ratio = f"{geo:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                goal = f"{sum(bool(f['goal']) for f in seeds)} of {len(seeds)}"
            lines.append(
                f"| {alpha} | {method} | {len(seeds)} | {sum(bests) / len(bests):.4f} ({min(bests):.4f}-"
                f"{max(bests):.4f}) | {hours} | {ratio} | {goal} |"
            )
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One row per alpha, one column per seed.
    alphas = list(dict.fromkeys(k.split("/")[0] for k in results))
    seeds = list(dict.fromkeys(k.split("/")[1] for k in results))
    fig, axes = plt.subplots(len(alphas), len(seeds), figsize=(6 * len(seeds), 4 * len(alphas)), squeeze=False)
    for key in results:
        alpha, seed = key.split("/")
        ax = axes[alphas.index(alpha)][seeds.index(seed)]
        # One colour per method in every panel, and the legend in METHODS' order, however the runs were merged.
        order = sorted(results[key], key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
        for method in order:
            res = results[key][method]
            points = [(r["sim_time_h"], r["val_acc"]) for r in res["rows"] if "val_acc" in r]
            hours = [h for h, _ in points]
            # Trial groups' clocks restart at each window (see hours_to): points only, no line through time.
            line = "-" if hours == sorted(hours) else "none"
            colour = f"C{METHODS.index(method)}" if method in METHODS else None
            ax.plot(*zip(*points, strict=True), label=method, marker=".", linestyle=line, color=colour)
        ax.set_title(f"alpha/seed {key}")
        ax.set_xlabel("simulated hours (fleet: 50% rpi4b, 30% orin_nano, 20% tx2)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat:
        if not ax.has_data():  # an (alpha, seed) that did not run
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out / "fleet.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--rounds", type=int, default=None, help="a cap on rounds (FedARA's schedule length); 60, or 6 with --tiny"
    )
    parser.add_argument("--max-sim-hours", type=float, default=0.5)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--val-examples", type=int, default=500)
    parser.add_argument("--trial-val-batches", type=int, default=8)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--min-partition-size", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--corpus", default="20NG")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    parser.add_argument("--bandwidth-mbps", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-3, help="SVD adapters")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--adapter-lr", type=float, default=5e-3)
    parser.add_argument("--target-fraction", type=float, default=0.99)
    parser.add_argument(
        "--target-over",
        nargs="+",
        choices=METHODS,
        help="the methods whose lowest best accuracy sets the target (default: all that ran for that alpha and seed)",
    )
    parser.add_argument(
        "--horizon-h",
        type=float,
        default=None,
        help="tabulate and plot every run only up to this simulated hour (default: each run as it stopped)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer smoke run on Stack Overflow titles")
    parser.add_argument("--from-results", type=Path, nargs="+", help="merge saved results.json files; train nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        merged: dict = {}
        for path in args.from_results:
            for key, runs in json.loads(path.read_text()).items():
                merged.setdefault(key, {}).update(runs)
        report(merged, args)
        return
    if args.tiny:
        args.corpus, args.layers, args.num_clients, args.clients_per_round = "stackoverflow", 2, 20, 6
        args.max_train_examples, args.val_examples, args.max_length = 200, 32, 32
        args.max_sim_hours, args.alphas, args.eval_every, args.trial_val_batches = 10.0, [1.0], 1, 1
    if args.rounds is None:
        args.rounds = 6 if args.tiny else 60
    results: dict = {}
    for alpha in args.alphas:
        for seed in args.seeds:
            runs = results.setdefault(f"{alpha}/{seed}", {})
            for method in args.methods:
                runs[method] = run(method, alpha, seed, args)
                # Saved after every method: a run stopped by hand keeps what finished.
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    (args.out / "results.json").write_text(json.dumps(results, indent=1))  # whole runs, whatever the horizon
    shown = within(results, args.horizon_h)
    text = table(shown, args.target_fraction, args.target_over)
    text += "\n\n" + summary(shown, args.target_fraction, args.target_over)
    lead = adapter_lead(shown, args.target_fraction, args.target_over)
    if lead:
        text += "\n\nGoal 2: FedAdapter (e) against the best fixed adapter configuration in hindsight\n\n" + lead
    (args.out / "table.md").write_text(text + "\n")
    plot(shown, args.out)
    print(text)


if __name__ == "__main__":
    main()
