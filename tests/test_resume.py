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
from test_distributed import _torchrun as _torchrun_file

MEASURED = {"train_time_s", "round_time_s", "step_time_ms", "peak_rss_mb", "saved_activation_mb", "rpc_s"}


def _fit(config: dict, path: Path, *args: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(path), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _config(name: str, out: Path, cache_dir: str, kill_round: int | None = None) -> dict:
    # "<run>-int8": int8 on the wire, whose downloads are differences from the run's starting state (kept
    # in the checkpoint: a resumed run must not take the state it resumed from as that reference).
    name, _, codec = name.partition("-")
    config = golden_config(name, out, cache_dir)
    if codec:
        config["federation"]["compression"] = codec
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
@pytest.mark.parametrize("name", [*RUNS, "fedavg-int8"])
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
    state = f"{name.partition('-')[0]}.state.pt"
    want, got = torch.load(straight / state), torch.load(broken / state)
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


def _three_rank_config(name: str, out: Path, cache_dir: str, kill_round: int | None = None) -> dict:
    # The golden runs, on 3 ranks: every rank trains at least one client per round (and FedAdapter's
    # trial groups are as large as a round); the final state is saved by the server only.
    config = _config(name, out, cache_dir, kill_round)
    callbacks = config["trainer"]["callbacks"]
    for i, callback in enumerate(callbacks):
        if callback["class_path"] == "golden_runs.SaveGlobalState":
            callbacks[i] = {"class_path": "dist_helpers.SaveGlobalState", "init_args": callback["init_args"]}
        if callback["class_path"].endswith("ProgressiveUpgrade"):
            callback["init_args"]["clients_per_group"] = 3
    if name == "fedadapter":
        config["federation"]["clients_per_round"] = 3
        config["data"]["num_clients"] = 12  # three trial groups of three distinct clients
        # The simulated clock charges activation-cache fills of the process a client trains on, and a
        # restarted process starts with an empty cache (docs/reliability.md): without it, every cell equal.
        config["model"]["activation_cache_mb"] = None  # off (the default, auto, would turn it on)
    return config


def _torchrun(config: dict, path: Path, *args: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    return _torchrun_file(path, 3, *args)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["fedadapter", "fedara"])
def test_three_ranks_with_the_server_killed_mid_round_resume_to_a_straight_runs_model(
    name: str, tmp_path: Path, cache_dir: str
) -> None:
    # torchrun tears the client ranks down with the server; all three start again with --ckpt_path last.
    # Only rank 0 has a checkpoint: the client ranks learn the round (and the state) from it.
    straight = tmp_path / "straight"
    proc = _torchrun(_three_rank_config(name, straight, cache_dir), tmp_path / "straight.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    broken = tmp_path / "broken"
    killed = _torchrun(_three_rank_config(name, broken, cache_dir, kill_round=2), tmp_path / "killed.yaml")
    assert killed.returncode != 0 and not (broken / f"{name}.state.pt").exists()
    (last,) = broken.rglob("last.ckpt")
    assert torch.load(last, weights_only=False)["epoch"] == 1  # rounds 0 and 1 were saved, round 2 was lost
    resumed = _torchrun(_three_rank_config(name, broken, cache_dir), tmp_path / "resumed.yaml", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("joins the run at round 2") == 2  # the client ranks read no checkpoint
    want, got = torch.load(straight / f"{name}.state.pt"), torch.load(broken / f"{name}.state.pt")
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), "not bit-identical"
    rows = _rows(broken)
    assert [int(r["round"]) for r in rows] == list(range(len(_rows(straight))))  # no round lost or repeated
    assert rows == _rows(straight)
