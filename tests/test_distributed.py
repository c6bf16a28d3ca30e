"""The multi-process runtime on torch.distributed RPC, on loopback: 3 processes on this machine."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fedpeft import FedAvg, FederatedServer
from lightning_fedpeft.launchers.rpc import ServerEndpoint
from lightning_fedpeft.strategy import ClientUpdate

TESTS = Path(__file__).parent


def _config(tmp_path: Path, cache_dir: str, name: str, callbacks: list[dict], **federation: object) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": 3,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / name)},
            },
            "callbacks": callbacks,
        },
        "model": {"num_hidden_layers": 2, "depth": 2, "width": 8, "lr": 5e-3},
        "data": {
            "corpus": "stackoverflow",
            "num_clients": 8,
            "max_train_examples": 320,
            "max_val_examples": 40,
            "max_test_examples": 40,
            "max_length": 32,
            "cache_dir": cache_dir,
        },
        "federation": {"clients_per_round": 6} | federation,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # same kernels (and summation order) in every process and in the reference
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env | extra


def _rounds(tmp_path: Path, name: str) -> list[dict[str, str]]:
    (path,) = (tmp_path / name).rglob("rounds.csv")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _save(path: Path) -> dict:
    return {"class_path": "dist_helpers.SaveGlobalState", "init_args": {"path": str(path)}}


def _torchrun(config: Path, nproc: int = 3) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "lightning_fedpeft", "fit", "--config", str(config)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)


def _fit(config: Path, nproc: int) -> subprocess.CompletedProcess:
    """``fedpeft fit`` in one process (the simulator) or under torchrun on ``nproc`` ranks; must succeed."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(config)]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    else:
        proc = _torchrun(config, nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(600)
def test_three_ranks_match_the_one_process_simulator(tmp_path: Path, cache_dir: str) -> None:
    _fit(_config(tmp_path, cache_dir, "one", [_save(tmp_path / "one.pt")]), 1)
    proc = _fit(_config(tmp_path, cache_dir, "three", [_save(tmp_path / "three.pt")]), 3)
    assert "test accuracy" in proc.stdout

    single, multi = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "three.pt")
    assert single.keys() == multi.keys()
    for name in single:
        assert torch.allclose(single[name], multi[name], atol=1e-5, rtol=1e-4), name
    # The global model really moved, so the agreement is not trivial.
    rows = _rounds(tmp_path, "three")
    assert [int(r["round"]) for r in rows] == [0, 1, 2] and all(int(r["clients"]) == 6 for r in rows)
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in _rounds(tmp_path, "one")]


@pytest.mark.timeout(600)
def test_fedara_over_three_ranks_matches_the_one_process_simulator(tmp_path: Path, cache_dir: str) -> None:
    # Importance travels in the updates across RPC, the mask shrinks the shapes every client adopts, and
    # emptied modules are pruned on the wire: the result must be the simulator's, to the float.
    fedara = [
        {
            "class_path": "lightning_fedpeft.fedara.RankAllocation",
            "init_args": {"target_rank": 0.5, "warmup_rounds": 1, "final_rounds": 1},
        },
        {"class_path": "lightning_fedpeft.fedara.ModulePruning"},
    ]
    model = {"num_hidden_layers": 2, "method": "svd", "rank": 4, "lr": 5e-3}
    runs = {}
    for name, nproc in (("one_svd", 1), ("three_svd", 3)):
        config = _config(tmp_path, cache_dir, name, [*fedara, _save(tmp_path / f"{name}.pt")])
        raw = yaml.safe_load(config.read_text())
        raw["model"] = model
        raw["trainer"]["max_epochs"] = 4
        config.write_text(yaml.safe_dump(raw))
        _fit(config, nproc)
        runs[name] = (torch.load(tmp_path / f"{name}.pt"), _rounds(tmp_path, name))

    (single, one_rows), (multi, three_rows) = runs["one_svd"], runs["three_svd"]
    assert single.keys() == multi.keys()
    for name in single:
        assert single[name].shape == multi[name].shape, name
        assert torch.allclose(single[name], multi[name], atol=1e-5, rtol=1e-4), name
    ranks = [float(r["active_ranks"]) for r in three_rows]
    assert ranks[0] == 48 and ranks[-1] == 6  # 12 modules x rank 4, down to 0.5 per module
    assert ranks == [float(r["active_ranks"]) for r in one_rows]
    assert [r["live_modules"] for r in three_rows] == [r["live_modules"] for r in one_rows]
    assert float(three_rows[-1]["live_modules"]) < 12  # some modules were pruned, on every rank alike
    assert [r["bytes_up"] for r in three_rows] == [r["bytes_up"] for r in one_rows]
    assert int(three_rows[-1]["bytes_down"]) < int(three_rows[0]["bytes_down"])  # only active triplets travel


@pytest.mark.timeout(600)
def test_fedadapter_over_three_ranks_matches_the_one_process_simulator(tmp_path: Path, cache_dir: str) -> None:
    # Trial groups are planned on the server and trained on whichever ranks hold their clients; the
    # decision, the grown adapters and the simulated clock must be the simulator's.
    upgrade = {
        "class_path": "lightning_fedpeft.fedadapter.ProgressiveUpgrade",
        "init_args": {"start_depth": 0, "start_width": 8, "clients_per_group": 3, "window_rounds": 1},
    }
    runs = {}
    for name, nproc in (("one_adapter", 1), ("three_adapter", 3)):
        config = _config(
            tmp_path,
            cache_dir,
            name,
            [upgrade, _save(tmp_path / f"{name}.pt")],
            clients_per_round=3,  # every rank trains at least one client per round
            cost_model={"class_path": "lightning_fedpeft.cost.CostModel", "init_args": {"device": "tx2"}},
        )
        raw = yaml.safe_load(config.read_text())
        raw["model"] |= {"depth": 0, "width": 8}
        raw["data"]["num_clients"] = 12  # three trial groups of three distinct clients
        raw["trainer"]["max_epochs"] = 4
        config.write_text(yaml.safe_dump(raw))
        _fit(config, nproc)
        (decisions,) = (tmp_path / name).rglob("decisions.csv")
        with open(decisions) as fh:
            runs[name] = (torch.load(tmp_path / f"{name}.pt"), _rounds(tmp_path, name), list(csv.DictReader(fh)))

    (single, one_rows, one_dec), (multi, three_rows, three_dec) = runs["one_adapter"], runs["three_adapter"]
    assert len(three_dec) >= 1 and len(three_dec) == len(one_dec)
    assert one_dec == three_dec  # the simulated clock included
    assert single.keys() == multi.keys()
    for name in single:
        assert single[name].shape == multi[name].shape, name
        assert torch.allclose(single[name], multi[name], atol=1e-5, rtol=1e-4), name
    assert {r["trial_depth"] for r in three_rows} >= {"0.0", "1.0"}  # more than one configuration trained
    for one, three in zip(one_rows, three_rows, strict=True):
        assert one["trial_depth"] == three["trial_depth"] and one["bytes_up"] == three["bytes_up"]
        # FLOPs come from fixed probes, not from whichever batch a rank met first (cost.py): same clock.
        assert float(one["sim_time_h"]) == pytest.approx(float(three["sim_time_h"]), rel=1e-9)


@pytest.mark.timeout(600)
def test_a_simulated_time_budget_ends_every_rank_after_the_same_round(tmp_path: Path, cache_dir: str) -> None:
    # Only the server knows the simulated clock; the client ranks learn that the run ends with the global
    # state they fetch. A client rank that missed it would wait for a round 1 that never opens and fail.
    config = _config(
        tmp_path,
        cache_dir,
        "budget",
        [_save(tmp_path / "budget.pt")],
        cost_model={"class_path": "lightning_fedpeft.cost.CostModel", "init_args": {"device": "tx2"}},
        max_sim_hours=1e-9,  # spent by the first round
        wait_timeout_s=120,
    )
    raw = yaml.safe_load(config.read_text())
    raw["trainer"]["max_epochs"] = 4
    config.write_text(yaml.safe_dump(raw))
    proc = _fit(config, 3)  # a rank left waiting fails within wait_timeout_s instead of hanging
    assert "test accuracy" in proc.stdout
    rows = _rounds(tmp_path, "budget")
    assert [int(r["round"]) for r in rows] == [0] and float(rows[0]["sim_time_h"]) >= 1e-9
    assert (tmp_path / "budget.pt").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_a_client_rank_killed_mid_round_does_not_stop_the_federation(tmp_path: Path, cache_dir: str) -> None:
    deadline = 60.0
    kill = {"class_path": "dist_helpers.KillRank", "init_args": {"rank": 2, "round": 1, "batch": 1}}
    config = _config(tmp_path, cache_dir, "kill", [kill], round_deadline_s=deadline, liveness_timeout_s=5.0)
    # Three independent processes, as on three boards: torchrun would tear the whole group down when
    # one worker dies, which is the opposite of what a federation wants.
    port = str(_free_port())
    cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(config)]
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd,
            env=_env(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    elapsed = time.monotonic() - start
    assert procs[2].returncode == -9  # killed mid-round
    assert procs[0].returncode == 0, outs[0][1][-3000:]
    assert procs[1].returncode == 0, outs[1][1][-3000:]

    rows = _rounds(tmp_path, "kill")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]  # the federation finished its rounds
    assert int(rows[0]["missing"]) == 0
    assert int(rows[1]["missing"]) == 2 and len(rows[1]["missing_clients"].split()) == 2  # rank 2's clients
    assert float(rows[1]["train_time_s"]) < deadline  # closed as soon as rank 2 went silent
    assert int(rows[2]["missing"]) == 0 and int(rows[2]["clients"]) == 6  # its clients moved to live ranks
    assert elapsed < 200


@pytest.mark.timeout(600)
def test_corrupted_updates_are_rejected_and_the_round_completes(tmp_path: Path, cache_dir: str) -> None:
    corrupt = {"class_path": "dist_helpers.CorruptUpdates", "init_args": {"rank": 1, "round": 0}}
    config = _config(tmp_path, cache_dir, "corrupt", [corrupt, _save(tmp_path / "final.pt")])
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rounds(tmp_path, "corrupt")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert int(rows[0]["clients"]) == 4 and len(rows[0]["rejected_clients"].split()) == 2
    assert "non-finite" in proc.stderr and "has shape (3,)" in proc.stderr
    assert all(int(r["clients"]) == 6 for r in rows[1:])
    assert all(torch.isfinite(t).all() for t in torch.load(tmp_path / "final.pt").values())


def test_the_endpoint_accepts_only_the_rank_assigned_to_a_client() -> None:
    server = FederatedServer(FedAvg(4, seed=0), num_clients=8)
    server.initialize({"w": torch.zeros(2)})
    endpoint = ServerEndpoint(server, world_size=2, mode="simulation", round_deadline_s=5, liveness_timeout_s=5)
    endpoint.open_round(0)
    ticket = endpoint.fetch_round(1, 0)
    assert ticket is not None and len(ticket.client_ids) == 2
    mine, theirs = ticket.client_ids[0], endpoint.fetch_round(0, 0).client_ids[0]
    assert not endpoint.submit(1, ClientUpdate(theirs, 0, 5, {"w": torch.ones(2)}))  # not rank 1's client
    assert not endpoint.submit(7, ClientUpdate(mine, 0, 5, {"w": torch.ones(2)}))  # no such rank
    assert endpoint.submit(1, ClientUpdate(mine, 0, 5, {"w": torch.ones(2)}))
    state, record = endpoint.close_when_ready(0)  # the deadline (5 s) closes it: two clients never answer
    assert record.received == [mine] and theirs in record.rejected
    assert torch.equal(state["w"], torch.ones(2))
    assert not endpoint.submit(1, ClientUpdate(mine, 0, 5, {"w": torch.ones(2)}))  # late: dropped
