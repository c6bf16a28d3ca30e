"""Fixed-seed runs of FedAvg, FedAdapter and FedARA whose results are kept in ``tests/data/golden/``.

The reference files were written by the code before the algorithm-interface redesign (commit 7316d22),
with this module run against that checkout::

    git worktree add /tmp/old 7316d22
    PYTHONPATH=/tmp/old:tests python tests/golden_runs.py --out tests/data/golden

``tests/test_golden.py`` runs the same configs on the current code and compares. Only what both versions
understand is used: the CLI (in this process, one thread, so the float summation order is fixed) and the
config class paths ``lightning_fedpeft.fedadapter.*`` and ``lightning_fedpeft.fedara.*``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_fedpeft.state import trainable_state

RUNS = ("fedavg", "fedadapter", "fedara")


def golden_config(name: str, out: Path, cache_dir: str) -> dict[str, Any]:
    """The config of golden run ``name``: 2-layer MiniLM, Stack Overflow titles, 8 clients, a few rounds."""
    config: dict[str, Any] = {
        "seed_everything": 7,
        "test_after_fit": False,
        "trainer": {
            "max_epochs": 3,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out / name)},
            },
            "callbacks": [
                {"class_path": "golden_runs.SaveGlobalState", "init_args": {"path": str(out / f"{name}.state.pt")}}
            ],
        },
        "model": {"num_hidden_layers": 2, "depth": 2, "width": 8, "lr": 5e-3},
        "data": {
            "corpus": "stackoverflow",
            "num_clients": 8,
            "max_train_examples": 240,
            "max_val_examples": 40,
            "max_test_examples": 40,
            "max_length": 32,
            "cache_dir": cache_dir,
        },
        "federation": {"clients_per_round": 3, "eval_every": 2, "seed": 3},
    }
    callbacks = config["trainer"]["callbacks"]
    if name == "fedadapter":
        callbacks.insert(
            0,
            {
                "class_path": "lightning_fedpeft.fedadapter.ProgressiveUpgrade",
                "init_args": {"start_depth": 0, "start_width": 8, "clients_per_group": 2, "window_rounds": 1},
            },
        )
        config["model"] |= {"depth": 0, "width": 8, "activation_cache_mb": 64}
        config["data"]["num_clients"] = 8
        config["trainer"]["max_epochs"] = 5
        config["federation"] |= {
            "clients_per_round": 2,
            "cost_model": {"class_path": "lightning_fedpeft.cost.CostModel", "init_args": {"device": "tx2"}},
        }
    elif name == "fedara":
        callbacks[:0] = [
            {
                "class_path": "lightning_fedpeft.fedara.RankAllocation",
                "init_args": {"target_rank": 0.5, "warmup_rounds": 1, "final_rounds": 1},
            },
            {"class_path": "lightning_fedpeft.fedara.ModulePruning"},
        ]
        config["model"] = {"num_hidden_layers": 2, "method": "svd", "rank": 4, "lr": 5e-3}
        config["trainer"]["max_epochs"] = 4
    elif name != "fedavg":
        raise ValueError(f"unknown golden run {name!r}; known: {', '.join(RUNS)}")
    return config


class SaveGlobalState(Callback):
    """On the server, save the final global trainable state to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(trainable_state(pl_module), self.path)


def run(name: str, out: Path, cache_dir: str, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run golden config ``name`` in this process with one thread; its final state, rounds and decisions.

    ``model``: settings added to the config's ``model`` (ones the current code has and the old did not).
    """
    from lightning_fedpeft.cli import run_cli

    config = golden_config(name, out, cache_dir)
    config["model"] |= model or {}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli(["fit", "--config", str(path)])
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"state": torch.load(out / f"{name}.state.pt")}
    for table in ("rounds", "decisions"):
        found = list((out / name).rglob(f"{table}.csv"))
        if found:
            with open(found[0]) as fh:
                result[table] = list(csv.DictReader(fh))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for <run>.pt")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    import lightning_fedpeft

    print(f"recording with {lightning_fedpeft.__file__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            result = run(name, Path(tmp), str(Path(tmp) / "tokens"))
            torch.save(result, out / f"{name}.pt")
            print(f"{name}: {len(result['state'])} tensors, {len(result.get('rounds', []))} rounds")


if __name__ == "__main__":
    main()
