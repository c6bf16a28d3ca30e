"""The ``fedpeft`` command, run as a newcomer would: a subprocess with a YAML config."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_fedpeft import RoundSync


def _config(tmp_path: Path, cache_dir: str, **data: object) -> Path:
    config = {
        "trainer": {
            "max_epochs": 2,
            "enable_checkpointing": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs")},
            },
        },
        "model": {"num_hidden_layers": 2, "depth": 2, "width": 8, "lr": 5e-3},
        "data": {
            "corpus": "stackoverflow",
            "num_clients": 6,
            "max_train_examples": 240,
            "max_val_examples": 60,
            "max_test_examples": 60,
            "max_length": 32,
            "cache_dir": cache_dir,
        }
        | data,
        "federation": {"clients_per_round": 3},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fedpeft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # `python -m lightning_fedpeft` is what the `fedpeft` console script runs; it also works before the
    # script is on PATH.
    return subprocess.run(
        [sys.executable, "-m", "lightning_fedpeft", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_fit_runs_rounds_and_prints_test_accuracy(tmp_path: Path, cache_dir: str) -> None:
    proc = _fedpeft("fit", "--config", str(_config(tmp_path, cache_dir)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    assert "Federated rounds" in proc.stdout
    (rounds_csv,) = (tmp_path / "runs").rglob("rounds.csv")
    with open(rounds_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert all(int(r["bytes_up"]) > 0 for r in rows)
    # Not a terminal: one plain line per round, with the time left until the last one.
    lines = [line for line in proc.stderr.splitlines() if "fedpeft: round " in line]
    assert len(lines) == 2 and "round 1/2 | clients 3 | loss " in lines[0] and "ETA " in lines[0], proc.stderr
    assert "round 2/2" in lines[1] and "val_acc " in lines[1] and "ETA" not in lines[1]

    # The report of that run: valid pictures with one series (the run), and a summary row that matches it.
    report = _fedpeft("report", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    from lightning_fedpeft.report import build_report

    drawn = build_report([tmp_path / "runs"], tmp_path / "series")  # what each picture plots (its own folder)
    run_name = str(rounds_csv.parent.relative_to(tmp_path))
    assert drawn["accuracy.png"] == {"val_acc~round": [run_name], "val_acc~mb_total": [run_name]}
    assert drawn["loss.png"] == {"train_loss~round": [run_name]}
    _assert_png(tmp_path / "report" / "accuracy.png")
    _assert_png(tmp_path / "report" / "loss.png")
    summary = (tmp_path / "report" / "summary.md").read_text()
    final = f"{float(rows[-1]['val_acc']):.4f}"
    assert f"| {run_name} | 2 |" in summary and final in summary and final in report.stdout


def test_report_numbers_rounds_as_the_progress_lines_do(tmp_path: Path) -> None:
    # A run still going, validated every other round: rounds.csv counts from 0, "round 1/N" is its row 0.
    run = tmp_path / "runs" / "going" / "version_0"
    run.mkdir(parents=True)
    (run / "rounds.csv").write_text(
        "round,train_loss,val_acc,bytes_up,bytes_down,round_time_s\n"
        "0,2.0,,1000000,1000000,3\n"
        "1,1.5,0.60,1000000,1000000,3\n"
        "2,1.2,,1000000,1000000,3\n"
        "3,1.0,0.55,1000000,1000000,3\n"
    )
    from lightning_fedpeft.report import build_report, find_runs

    (going,) = find_runs([tmp_path / "runs"])
    assert going.series("val_acc") == ([2.0, 4.0], [0.60, 0.55])
    assert going.series("train_loss")[0] == [1.0, 2.0, 3.0, 4.0]
    build_report([tmp_path / "runs"], tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| runs/going/version_0 | 4 | 0.6000 (2) | 0.5500 | 8.0 |  | 12 |" in summary, summary
    _assert_png(tmp_path / "report" / "accuracy.png")


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


def test_cli_bad_setting_exits_with_a_message_naming_it(tmp_path: Path, cache_dir: str) -> None:
    proc = _fedpeft("fit", "--config", str(_config(tmp_path, cache_dir, corpus="20news")), cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.corpus='20news'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("rounds.csv"))

    proc = _fedpeft(
        "fit", "--config", str(_config(tmp_path, cache_dir)), "--federation.clients_per_round=9", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "federation.clients_per_round=9" in proc.stderr


def test_cli_help_lists_the_settings(tmp_path: Path) -> None:
    proc = _fedpeft("fit", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for setting in (
        "--model.method",
        "--data.corpus",
        "--data.alpha",
        "--federation.clients_per_round",
        "--federation.eval_every",
    ):
        assert setting in proc.stdout, setting


REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.num_hidden_layers=2",
    "--data.corpus=stackoverflow",
    "--data.num_clients=12",
    "--data.max_train_examples=240",
    "--data.max_val_examples=48",
    "--data.max_test_examples=48",
    "--data.max_length=32",
]


def test_fedadapter_config_runs_trial_windows_through_the_cli(tmp_path: Path, cache_dir: str) -> None:
    config = REPO / "configs" / "fedadapter" / "fedadapter.yaml"
    args = [*TINY, f"--data.cache_dir={cache_dir}", "--trainer.max_epochs=3", "--federation.eval_every=3"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_checkpointing=false"]
    args += ["--federation.clients_per_round=2", "--trainer.callbacks.init_args.window_rounds=1"]
    proc = _fedpeft("fit", "--config", str(config), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rounds_csv,) = (tmp_path / "runs").rglob("rounds.csv")
    with open(rounds_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(float(r["sim_time_h"]) > 0 for r in rows)
    assert {r["trial_depth"] for r in rows} == {"0.0", "1.0"}  # the shallow and the deeper group both trained
    (decisions_csv,) = (tmp_path / "runs").rglob("decisions.csv")
    with open(decisions_csv) as fh:
        (decision,) = list(csv.DictReader(fh))
    # The winner is the trial with the best validation accuracy (a tie goes to the earlier, cheaper one),
    # and the decided configuration is that trial's.
    trials = re.findall(r"(\w+)\((\d+),(\d+)\): \d+ rounds -> ([\d.]+|nan)", decision["trials"])
    assert [name for name, *_ in trials] == ["shallow", "deeper"]
    best = max(range(len(trials)), key=lambda k: (float(trials[k][3]), -k))
    name, depth, width, acc = trials[best]
    assert decision["winner"] == name and (decision["depth"], decision["width"]) == (depth, width)
    assert float(decision["val_acc"]) == pytest.approx(float(acc), abs=1e-4)

    # Its report: accuracy against simulated hours too, and the trial configuration over rounds.
    from lightning_fedpeft.report import build_report

    drawn = build_report([tmp_path / "runs"], tmp_path / "report")
    (name,) = drawn["loss.png"]["train_loss~round"]
    assert drawn["accuracy.png"]["val_acc~sim_time_h"] == [name]
    assert drawn["fedadapter.png"] == {"trial_depth~round": [name], "trial_width~round": [name]}
    _assert_png(tmp_path / "report" / "fedadapter.png")


def _printed_config(config: Path, tmp_path: Path) -> dict:
    """The config ``fedpeft fit --print_config`` resolves (every default filled in), parsed."""
    proc = _fedpeft("fit", "--config", str(config), "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, (config.name, proc.stderr[-2000:])
    return yaml.safe_load(proc.stdout)


def test_every_baseline_config_parses(tmp_path: Path) -> None:
    configs = sorted((REPO / "configs" / "fedadapter").glob("*.yaml"))
    assert len(configs) == 6
    for config in configs:
        resolved = _printed_config(config, tmp_path)
        written = yaml.safe_load(config.read_text())
        cost = resolved["federation"]["cost_model"]
        assert cost["class_path"] == "lightning_fedpeft.cost.CostModel", config.name
        expected = {"device": "tx2", "bandwidth_mbps": 1.0, "devices_file": None, "fleet": None}
        assert cost["init_args"] == expected, config.name
        assert resolved["model"]["method"] == written["model"]["method"], config.name
        assert resolved["data"]["num_clients"] == 100 and resolved["data"]["alpha"] == 1.0, config.name


def test_fedara_config_allocates_ranks_through_the_cli(tmp_path: Path, cache_dir: str) -> None:
    config = yaml.safe_load((REPO / "configs" / "fedara" / "fedara.yaml").read_text())
    allocation, pruning = config["trainer"]["callbacks"]
    assert pruning["class_path"].endswith("ModulePruning")
    allocation["init_args"] |= {"warmup_rounds": 1, "final_rounds": 1}
    config["trainer"] |= {"max_epochs": 4, "enable_checkpointing": False}
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["model"] |= {"num_hidden_layers": 2, "rank": 2}
    config["data"] |= {"corpus": "stackoverflow", "max_train_examples": 200, "max_val_examples": 40}
    config["data"] |= {"max_test_examples": 40, "max_length": 32, "num_clients": 10, "cache_dir": cache_dir}
    config["federation"] |= {"clients_per_round": 2, "eval_every": 4}
    path = tmp_path / "fedara.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _fedpeft("fit", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rounds_csv,) = (tmp_path / "runs").rglob("rounds.csv")
    with open(rounds_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["active_ranks"]) for r in rows][-1] == 12.0  # target rank 1 x 12 modules
    assert float(rows[-1]["bytes_down"]) < float(rows[0]["bytes_down"])
    assert all(r["step_time_ms"] and r["saved_activation_mb"] for r in rows)

    # Its report: the rank budget, the active ranks and the live modules over rounds, and client resources.
    from lightning_fedpeft.report import build_report

    drawn = build_report([tmp_path / "runs"], tmp_path / "report")
    (name,) = drawn["loss.png"]["train_loss~round"]
    assert drawn["fedara.png"] == {f"{c}~round": [name] for c in ("budget", "active_ranks", "live_modules")}
    assert drawn["clients.png"]["step_time_ms~round"] == [name]
    _assert_png(tmp_path / "report" / "fedara.png")
    assert "fedadapter.png" not in drawn  # no FedAdapter columns in a FedARA run: no empty picture


def test_every_fedara_config_parses(tmp_path: Path) -> None:
    configs = sorted((REPO / "configs" / "fedara").glob("*.yaml"))
    assert [c.name for c in configs] == ["fedara.yaml", "lora_fedavg.yaml", "svd_fixed.yaml"]
    expected_callbacks = {
        "fedara.yaml": ["lightning_fedpeft.fedara.RankAllocation", "lightning_fedpeft.fedara.ModulePruning"],
        "lora_fedavg.yaml": ["lightning_fedpeft.callbacks.ClientResources"],
        "svd_fixed.yaml": ["lightning_fedpeft.callbacks.ClientResources"],
    }
    methods = {"fedara.yaml": "svd", "lora_fedavg.yaml": "lora", "svd_fixed.yaml": "svd"}
    for config in configs:
        resolved = _printed_config(config, tmp_path)
        assert resolved["data"]["alpha"] == 1.0 and resolved["data"]["num_clients"] == 100, config.name
        assert resolved["model"]["method"] == methods[config.name]
        paths = [cb["class_path"] for cb in resolved["trainer"]["callbacks"]]
        assert paths == expected_callbacks[config.name], (config.name, paths)


def test_every_fleet_config_parses(tmp_path: Path) -> None:
    configs = sorted((REPO / "configs" / "fleet").glob("*.yaml"))
    names = ["depth_ranks.yaml", "fedadapter_fleet.yaml", "fedara_fleet.yaml", "hetero_lora.yaml"]
    assert [c.name for c in configs] == names
    for config in configs:
        resolved = _printed_config(config, tmp_path)
        fleet = resolved["federation"]["cost_model"]["init_args"]["fleet"]
        assert fleet["fractions"] == {"rpi4b": 0.5, "orin_nano": 0.3, "tx2": 0.2}, config.name
        assert resolved["federation"]["clients_per_round"] == 10 and resolved["data"]["num_clients"] == 100
        callbacks = [cb["class_path"].rsplit(".", 1)[-1] for cb in resolved["trainer"]["callbacks"]]
        assert callbacks[0] in {"DepthRankUpgrade", "ProgressiveUpgrade", "RankAllocation", "HeterogeneousLoRA"}
    (hetero,) = _printed_config(REPO / "configs" / "fleet" / "hetero_lora.yaml", tmp_path)["trainer"]["callbacks"]
    assert hetero["init_args"] == {"ranks": {"rpi4b": 2, "orin_nano": 8, "tx2": 8}, "rule": "per_coordinate"}


def test_every_launch_recipe_is_valid_bash() -> None:
    recipes = sorted((REPO / "launchers").iterdir())
    assert len(recipes) >= 4
    for recipe in recipes:
        proc = subprocess.run(["bash", "-n", str(recipe)], capture_output=True, text=True)
        assert proc.returncode == 0, (recipe.name, proc.stderr)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_aggregator_server_optimizer_and_attack_are_chosen_in_yaml(tmp_path: Path, cache_dir: str) -> None:
    from lightning_fedpeft.aggregation import FedAdam, TrimmedMean
    from lightning_fedpeft.attacks import ScaledUpdateAttack
    from lightning_fedpeft.cli import run_cli

    config = {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning_fedpeft.attacks.ScaledUpdateAttack", "init_args": {"clients": [1]}}
            ],
        },
        "model": {"num_hidden_layers": 1, "depth": 1, "width": 4},
        "data": {"corpus": "stackoverflow", "num_clients": 6, "max_train_examples": 60, "cache_dir": cache_dir},
        "federation": {
            "clients_per_round": 5,
            "aggregator": {"class_path": "lightning_fedpeft.aggregation.TrimmedMean", "init_args": {"trim": 2}},
            "server_optimizer": {"class_path": "lightning_fedpeft.aggregation.FedAdam", "init_args": {"lr": 0.05}},
        },
    }
    path = tmp_path / "robust.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(["--config", str(path)], run=False)
    sync = RoundSync.find(cli.trainer)
    assert isinstance(sync.aggregator, TrimmedMean) and sync.aggregator.trim == 2
    assert isinstance(sync.server_optimizer, FedAdam) and sync.server_optimizer.lr == 0.05
    (attack,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ScaledUpdateAttack)]
    assert attack.clients == {1} and attack.factor == -10.0


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize(
    ("flag", "expected_mb"),
    [(None, 1024.0), ("--model.activation_cache_mb=256", 256.0), ("--model.activation_cache_mb=null", None)],
)
def test_the_activation_cache_setting_from_the_command_line(
    tmp_path: Path, cache_dir: str, flag: str | None, expected_mb: float | None
) -> None:
    from lightning_fedpeft.cli import run_cli

    path = _config(tmp_path, cache_dir)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["depth"] = 1  # the top layer of two: a frozen bottom
    path.write_text(yaml.safe_dump(raw))
    cli = run_cli(["--config", str(path), *([flag] if flag else [])], run=False)
    cache = cli.model.activation_cache
    assert (cache.max_bytes / 2**20 if cache is not None else None) == expected_mb
