"""A run killed mid-round (kill -9) and resumed with --ckpt_path last ends exactly where a straight run ends.

The runs are the golden ones (FedAvg, FedAdapter growing its adapters, FedARA masking and pruning), in one
process each, through the CLI, with checkpoints on: every round writes last.ckpt atomically into a folder
that does not change with the logger's version.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from golden_runs import RUNS, golden_config
from test_distributed import _env

MEASURED = {"train_time_s", "round_time_s", "step_time_ms", "peak_rss_mb", "saved_activation_mb"}


def _fit(config: dict, path: Path, *args: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(path), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _config(name: str, out: Path, cache_dir: str, kill_round: int | None = None) -> dict:
    config = golden_config(name, out, cache_dir)
    config["trainer"]["enable_checkpointing"] = True
    if kill_round is not None:  # SIGKILL in the middle of that round (its second batch)
        kill = {"class_path": "dist_helpers.KillRank", "init_args": {"rank": 0, "round": kill_round, "batch": 1}}
        config["trainer"]["callbacks"].append(kill)
    return config


def _rows(folder: Path) -> list[dict[str, str]]:
    (path,) = sorted(folder.rglob("rounds.csv"), key=os.path.getmtime)[-1:]
    with open(path) as fh:
        return [{k: v for k, v in row.items() if k not in MEASURED} for row in csv.DictReader(fh)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", RUNS)
def test_killed_mid_round_and_resumed_equals_a_straight_run(name: str, tmp_path: Path, cache_dir: str) -> None:
    straight = tmp_path / "straight"
    proc = _fit(_config(name, straight, cache_dir), tmp_path / "straight.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    broken = tmp_path / "broken"
    killed = _fit(_config(name, broken, cache_dir, kill_round=2), tmp_path / "killed.yaml")
    assert killed.returncode == -9  # killed in round 2: rounds 0 and 1 are in last.ckpt
    (last,) = broken.rglob("last.ckpt")
    resumed = _fit(_config(name, broken, cache_dir), tmp_path / "resumed.yaml", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = torch.load(straight / f"{name}.state.pt"), torch.load(broken / f"{name}.state.pt")
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), "not bit-identical"
    rows = _rows(broken)
    assert [int(r["round"]) for r in rows] == list(range(len(_rows(straight))))  # no round lost or repeated
    assert rows == _rows(straight)


def test_a_checkpoint_of_another_config_or_a_damaged_one_is_refused_and_left_alone(
    tmp_path: Path, cache_dir: str
) -> None:
    out = tmp_path / "run"
    assert _fit(_config("fedavg", out, cache_dir), tmp_path / "a.yaml").returncode == 0
    (last,) = out.rglob("last.ckpt")
    before = last.read_bytes()
    other = _config("fedavg", out, cache_dir)
    other["model"] |= {"method": "lora", "rank": 2}
    proc = _fit(other, tmp_path / "b.yaml", "--ckpt_path", "last")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.method='adapter' there, 'lora' here" in proc.stderr
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(before[: len(before) // 2])
    proc = _fit(_config("fedavg", out, cache_dir), tmp_path / "c.yaml", "--ckpt_path", str(damaged))
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    assert last.read_bytes() == before and damaged.stat().st_size == len(before) // 2  # both left as they were
