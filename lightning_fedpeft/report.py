"""``fedpeft report RUN_DIR [RUN_DIR ...]``: pictures and a summary table from runs' logs.

Reads every ``rounds.csv`` under the given folders (each one is a run, named by its folder) and writes
into ``--out``:

* ``accuracy.png``: the validation metric against round, against simulated hours (runs with a cost
  model) and against megabytes exchanged (up + down, all clients, summed over rounds);
* ``loss.png``: the clients' mean training loss against round;
* ``fedadapter.png``: FedAdapter's trial configuration (depth and width) over rounds;
* ``fedara.png``: FedARA's rank budget, active ranks and live modules over rounds;
* ``clients.png``: client step time and peak memory over rounds (``ClientResources``);
* ``summary.md``: one row per run (rounds, best and final validation metric, MB, simulated hours, wall
  time).

Rounds are numbered from 1, as the progress lines number them. A picture is drawn only when some run has
its columns. ``rounds.csv`` is rewritten whole at every round's end (atomically), so a report on a run
still going shows the rounds so far. Uses matplotlib (Agg: no screen needed).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The validation metric a run is judged by, in order of preference (a classifier's, then a decoder's).
METRICS = ("val_acc", "val_exact_match", "val_f1", "val_ppl")
LOWER_IS_BETTER = {"val_ppl"}


@dataclass
class Run:
    """One run's rounds, as read from its ``rounds.csv`` (numbers only)."""

    name: str
    rows: list[dict[str, float]]

    def series(self, column: str, x: str = "round") -> tuple[list[float], list[float]]:
        """The (x, y) points of ``column`` in the rows that have it (validation runs every few rounds)."""
        points = [(r[x], r[column]) for r in self.rows if _finite(r.get(column)) and _finite(r.get(x))]
        return [p[0] for p in points], [p[1] for p in points]

    def has(self, column: str) -> bool:
        return any(_finite(r.get(column)) for r in self.rows)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Every ``rounds.csv`` under ``folders``, as runs named by their folder (relative to the one given)."""
    runs: list[Run] = []
    for folder in map(Path, folders):
        if not folder.exists():
            raise ValueError(f"report: {folder} does not exist; give the folder a run logged into (its save_dir)")
        paths = [folder] if folder.is_file() else sorted(folder.rglob("rounds.csv"))
        for path in paths:
            with open(path, newline="") as fh:  # numbers only: empty cells (no validation that round) drop out
                rows = [{k: x for k, v in row.items() if (x := _number(v)) is not None} for row in csv.DictReader(fh)]
            total = 0.0
            for row in rows:  # cumulative MB: what the run has exchanged by the end of each round
                # rounds.csv counts rounds from 0 (Lightning's epoch); the report numbers them from 1, as the
                # progress lines do ("round 1/N" is the first round done), so both name a round alike.
                if "round" in row:
                    row["round"] += 1
                total += (row.get("bytes_up", 0.0) + row.get("bytes_down", 0.0)) / 1e6
                row["mb_total"] = total
            # Named by its folder below the parent of the one given: runs/quickstart -> quickstart/version_0
            base = folder.resolve().parent if folder.is_dir() else path.resolve().parent.parent
            runs.append(Run(str(path.resolve().parent.relative_to(base)), rows))
    if not runs:
        raise ValueError(f"report: no rounds.csv under {', '.join(map(str, folders))}; is it a run's save_dir?")
    return runs


def metric_of(runs: Sequence[Run]) -> str | None:
    """The validation metric the runs share (the first of METRICS that any run logged)."""
    return next((m for m in METRICS if any(run.has(m) for run in runs)), None)


def _figure(panels: int):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    return plt, fig, list(axes[0])


def _plot(runs: Sequence[Run], panels: Sequence[tuple[str, str, str]], title: str, path: Path) -> dict[str, list[str]]:
    """One figure of ``panels`` (x column, y column, x label); returns each panel's series labels."""
    plt, fig, axes = _figure(len(panels))
    drawn: dict[str, list[str]] = {}
    for ax, (x, y, xlabel) in zip(axes, panels, strict=True):
        labels = []
        for run in runs:
            xs, ys = run.series(y, x)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=run.name)
                labels.append(run.name)
        ax.set(xlabel=xlabel, ylabel=y, title=f"{y} against {xlabel}")
        if labels:
            ax.legend(fontsize=7)
        drawn[f"{y}~{x}"] = labels
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def summary(runs: Sequence[Run], metric: str | None) -> str:
    """The markdown table: one row per run."""
    head = ["run", "rounds"]
    if metric:
        head += [f"best {metric} (round)", f"final {metric}"]
    head += ["MB exchanged", "simulated h", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        cells = [run.name, str(len(run.rows))]
        if metric:
            rounds, values = run.series(metric)
            if values:
                pick = min if metric in LOWER_IS_BETTER else max
                best = pick(range(len(values)), key=values.__getitem__)
                cells += [f"{values[best]:.4f} ({int(rounds[best])})", f"{values[-1]:.4f}"]
            else:
                cells += ["", ""]
        last = run.rows[-1] if run.rows else {}
        cells.append(f"{last.get('mb_total', 0.0):.1f}")
        cells.append(f"{last['sim_time_h']:.3f}" if _finite(last.get("sim_time_h")) else "")
        cells.append(f"{sum(r.get('round_time_s', 0.0) for r in run.rows):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(folders: Sequence[str | Path], out: str | Path) -> dict[str, dict[str, list[str]]]:
    """Write the pictures and ``summary.md`` into ``out``; returns, per picture, each panel's series."""
    runs = find_runs(folders)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = metric_of(runs)
    drawn: dict[str, dict[str, list[str]]] = {}
    if metric:
        panels = [("round", metric, "round")]
        if any(run.has("sim_time_h") for run in runs):
            panels.append(("sim_time_h", metric, "simulated hours"))
        panels.append(("mb_total", metric, "MB exchanged"))
        drawn["accuracy.png"] = _plot(runs, panels, "Global model on the validation split", out / "accuracy.png")
    drawn["loss.png"] = _plot(runs, [("round", "train_loss", "round")], "Clients' training loss", out / "loss.png")
    optional = {
        "fedadapter.png": (("trial_depth", "trial_width"), "FedAdapter: the trial configuration"),
        "fedara.png": (("budget", "active_ranks", "live_modules"), "FedARA: rank budget and live modules"),
        "clients.png": (("step_time_ms", "peak_rss_mb"), "Clients: step time and peak memory"),
    }
    for name, (columns, title) in optional.items():
        present = [c for c in columns if any(run.has(c) for run in runs)]
        if present:
            drawn[name] = _plot(runs, [("round", c, "round") for c in present], title, out / name)
    (out / "summary.md").write_text(summary(runs, metric) + "\n")
    return drawn


def main(args: Sequence[str] | None = None) -> None:
    """``fedpeft report``: parse the arguments and write the report."""
    parser = argparse.ArgumentParser(
        prog="fedpeft report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="folders with runs' logs (a save_dir, or one version's folder)")
    parser.add_argument("--out", "-o", default="report", help="folder for the PNG files and summary.md")
    parsed = parser.parse_args(args)
    try:
        drawn = build_report(parsed.runs, parsed.out)
    except ValueError as err:
        parser.exit(2, f"fedpeft: error: {err}\n")
    out = Path(parsed.out)
    print((out / "summary.md").read_text())
    print("wrote " + ", ".join(str(out / name) for name in [*drawn, "summary.md"]))
