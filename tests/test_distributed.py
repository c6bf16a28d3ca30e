"""The multi-process runtime on torch.distributed RPC, on loopback: 3 processes on this machine."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.rpc as torch_rpc
import yaml

from lightning_fedpeft import FedAvg, FederatedServer, FederationAborted
from lightning_fedpeft.launchers.codec import Codec
from lightning_fedpeft.launchers.rpc import RPCLauncher
from lightning_fedpeft.launchers.rpc_server import Aborted, ServerEndpoint
from lightning_fedpeft.protocol import ClientUpdate, RoundPlan

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


FLEET_COST = {
    "class_path": "lightning_fedpeft.cost.CostModel",
    "init_args": {"fleet": {"fractions": {"rpi4b": 0.5, "orin_nano": 0.25, "tx2": 0.25}}},
}


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


def _torchrun(config: Path, nproc: int = 3, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "lightning_fedpeft", "fit", "--config", str(config), *args]
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
    # The global model really moved (every tensor, far beyond the tolerance), so the agreement is not trivial.
    start = torch.load(tmp_path / "three.pt.initial")
    moved = {n: float((multi[n] - start[n]).abs().max()) for n in multi}
    assert min(moved.values()) > 1e-3, moved
    rows = _rounds(tmp_path, "three")
    assert [int(r["round"]) for r in rows] == [0, 1, 2] and all(int(r["clients"]) == 6 for r in rows)
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in _rounds(tmp_path, "one")]


@pytest.mark.timeout(600)
def test_fedara_on_a_fleet_over_three_ranks_matches_the_one_process_simulator(tmp_path: Path, cache_dir: str) -> None:
    # Importance travels in the updates across RPC, the mask shrinks the shapes every client adopts, and
    # emptied modules are pruned on the wire: the result must be the simulator's, to the float. On a fleet,
    # every client's prefix travels in its instructions too, and its own device times it. (One run on a fleet
    # covers the one-device path's wire too, which it extends by the prefixes; a one-device variant cost the
    # suite 40 s for no code of its own.)
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
        raw["federation"]["cost_model"] = FLEET_COST
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
    for column in ("mean_client_triplets", "min_client_triplets", "sim_round_s"):
        assert [r[column] for r in three_rows] == [r[column] for r in one_rows], column
    assert float(three_rows[0]["min_client_triplets"]) < 48, "the Raspberry Pis train a prefix"
    (configs,) = (tmp_path / "three_svd").rglob("client_configs.csv")
    assert len(configs.read_text().splitlines()) == 1 + 4 * 6  # a header and every client of 4 rounds


@pytest.mark.timeout(600)
def test_fedadapter_on_a_fleet_over_three_ranks_matches_the_one_process_simulator(
    tmp_path: Path, cache_dir: str
) -> None:
    # Trial groups are planned on the server and trained on whichever ranks hold their clients; the
    # decision, the grown adapters and the simulated clock must be the simulator's. On a fleet, the groups are
    # drawn within device classes and every client's depth travels in its instructions. (As for FedARA, the
    # fleet run covers the one-device wire, which it extends by the depths; the plan is made on the server
    # alike in both layouts, and test_fedadapter.py tests one-device planning in one process.)
    upgrade = {
        "class_path": "lightning_fedpeft.fedadapter.ProgressiveUpgrade",
        "init_args": {"start_depth": 0, "start_width": 8, "window_rounds": 1},
    }
    runs = {}
    for name, nproc in (("one_adapter", 1), ("three_adapter", 3)):
        config = _config(
            tmp_path,
            cache_dir,
            name,
            [upgrade, _save(tmp_path / f"{name}.pt")],
            clients_per_round=3,  # every rank trains at least one client per round
            cost_model=FLEET_COST,
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
        assert one["mean_train_depth"] == three["mean_train_depth"]


def _one_and_three(tmp_path: Path, cache_dir: str, tag: str, callbacks: list[dict], model: dict, **federation):
    """The same 4-round ``fedpeft fit`` of 12 clients, 3 per round, in one process and on 3 ranks; for each,
    the saved global state and the rounds' rows."""
    runs = {}
    for name, nproc in ((f"one_{tag}", 1), (f"three_{tag}", 3)):
        config = _config(
            tmp_path, cache_dir, name, [*callbacks, _save(tmp_path / f"{name}.pt")], clients_per_round=3, **federation
        )
        raw = yaml.safe_load(config.read_text())
        raw["model"] = {"num_hidden_layers": 2, "lr": 5e-3} | model
        raw["data"]["num_clients"] = 12
        raw["trainer"]["max_epochs"] = 4
        config.write_text(yaml.safe_dump(raw))
        _fit(config, nproc)
        runs[nproc] = (torch.load(tmp_path / f"{name}.pt"), _rounds(tmp_path, name))
    return runs[1], runs[3]


def _same_state(single: dict, multi: dict) -> None:
    assert single.keys() == multi.keys()
    for name in single:
        assert single[name].shape == multi[name].shape, name
        assert torch.allclose(single[name], multi[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.timeout(600)
def test_heterogeneous_lora_over_three_ranks_matches_the_one_process_simulator(tmp_path: Path, cache_dir: str) -> None:
    # Each client's rank comes from its device (dealt on the server) and travels in its instructions; the
    # per-coordinate average and every client's own clock must be the simulator's.
    hetero = {
        "class_path": "lightning_fedpeft.HeterogeneousLoRA",
        "init_args": {"ranks": {"rpi4b": 2, "orin_nano": 4, "tx2": 4}},
    }
    model = {"method": "lora", "rank": 4, "lora_alpha": 8}
    (single, one_rows), (multi, three_rows) = _one_and_three(
        tmp_path, cache_dir, "hetlora", [hetero], model, cost_model=FLEET_COST
    )
    _same_state(single, multi)
    for column in ("bytes_up", "sim_round_s"):
        assert [r[column] for r in three_rows] == [r[column] for r in one_rows], column
    # Not trivial: a rank-2 client left coordinates 2-3 to the others, and the lower-rank rows moved.
    b = next(k for k in multi if k.endswith("lora_B.default.weight"))
    assert float(multi[b][:, 2:].abs().max()) > 0 and float(multi[b][:, :2].abs().max()) > 0


@pytest.mark.timeout(600)
def test_depth_ranks_over_three_ranks_matches_the_one_process_simulator(tmp_path: Path, cache_dir: str) -> None:
    # FedAdapter x FedARA: trial groups over depth, dormant modules woken, ranks masked by the winner's
    # importance; across RPC the decisions, shapes and clock must be the simulator's. The activation cache is
    # off: a process's cache serves every client it hosts (and the server's trial validation), so with it the
    # clock charges fills per process, not per client, and one process and three ranks differ (docs/fleet.md).
    # On a fleet: the groups are drawn within device classes and every client's train depth travels in its
    # instructions, each module averaged over the clients that trained it.
    upgrade = {
        "class_path": "lightning_fedpeft.depth_ranks.DepthRankUpgrade",
        "init_args": {"start_depth": 1, "window_s": 0.2, "max_val_batches": 2, "warmup_windows": 0, "decay_windows": 2},
    }
    model = {"method": "svd", "rank": 4, "activation_cache_mb": None}
    (single, one_rows), (multi, three_rows) = _one_and_three(
        tmp_path, cache_dir, "depth_ranks", [upgrade], model, cost_model=FLEET_COST
    )
    _same_state(single, multi)
    columns = ("trial_depth", "min_train_depth", "mean_train_depth", "live_modules", "active_ranks", "bytes_up")
    for column in (*columns, "sim_round_s"):
        assert [r[column] for r in three_rows] == [r[column] for r in one_rows], column
    assert {r["trial_depth"] for r in three_rows} == {"1.0", "2.0"}, "a deeper trial ran"
    assert any(float(r["min_train_depth"]) < float(r["trial_depth"]) for r in three_rows), "a Pi trained less"
    last = three_rows[-1]
    assert float(last["active_ranks"]) < 4 * float(last["live_modules"]), "a decision masked ranks"


@pytest.mark.timeout(600)
def test_a_decoder_over_three_ranks_matches_the_one_process_simulator(
    tmp_path: Path, cache_dir: str, tiny_llama: str
) -> None:
    # Instruction tuning of a (tiny, random) Llama with LoRA: the response-only loss, the seven adapted
    # kinds and the tokenizer's own sequences travel the same way as a classifier's.
    runs = {}
    for name, nproc in (("one_llm", 1), ("three_llm", 3)):
        config = _config(tmp_path, cache_dir, name, [_save(tmp_path / f"{name}.pt")], eval_every=3)
        raw = yaml.safe_load(config.read_text())
        raw["model"] = {"model_name_or_path": tiny_llama, "task": "causal_lm", "method": "lora", "rank": 4}
        raw["model"] |= {"lr": 1e-2, "max_new_tokens": 0}
        raw["data"] |= {"corpus": "clinc", "max_length": 40, "partitioner": "iid", "batch_size": 8}
        raw["test_after_fit"] = False
        config.write_text(yaml.safe_dump(raw))
        _fit(config, nproc)
        runs[name] = (torch.load(tmp_path / f"{name}.pt"), _rounds(tmp_path, name))
    (single, one_rows), (multi, three_rows) = runs["one_llm"], runs["three_llm"]
    assert single.keys() == multi.keys() and all(".lora_" in k for k in single)
    for name in single:
        assert torch.allclose(single[name], multi[name], atol=1e-5, rtol=1e-4), name
    start = torch.load(tmp_path / "three_llm.pt.initial")
    assert max(float((multi[n] - start[n]).abs().max()) for n in multi) > 1e-3  # it trained
    assert [r["bytes_up"] for r in three_rows] == [r["bytes_up"] for r in one_rows]
    assert float(three_rows[-1]["val_loss"]) == pytest.approx(float(one_rows[-1]["val_loss"]), rel=1e-4)


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


def _plain_processes(config: Path, per_rank: list[list[str]] | None = None, timeout: float = 240) -> tuple:
    """``fedpeft fit`` in 3 independent processes (no torchrun), as on three boards; ``per_rank``: extra args.

    torchrun would tear the whole group down when one worker dies, which is the opposite of what a
    federation wants. Returns the processes, their (stdout, stderr) and the seconds until all had ended.
    """
    port = str(_free_port())
    cmd = [sys.executable, "-m", "lightning_fedpeft", "fit", "--config", str(config)]
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd + (per_rank[r] if per_rank else []),
            env=_env(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return procs, outs, time.monotonic() - start


@pytest.mark.timeout(300)
def test_a_client_rank_killed_mid_round_does_not_stop_the_federation(tmp_path: Path, cache_dir: str) -> None:
    deadline = 60.0
    kill = {"class_path": "dist_helpers.KillRank", "init_args": {"rank": 2, "round": 1, "batch": 1}}
    config = _config(tmp_path, cache_dir, "kill", [kill], round_deadline_s=deadline, liveness_timeout_s=5.0)
    procs, outs, elapsed = _plain_processes(config)
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


@pytest.mark.timeout(300)
def test_an_exception_in_one_ranks_training_step_ends_every_rank_promptly(tmp_path: Path, cache_dir: str) -> None:
    fail = {"class_path": "dist_helpers.FailInTrainingStep", "init_args": {"rank": 1, "round": 1}}
    # Liveness and deadline far away: only the failure report may end the other ranks this fast.
    config = _config(tmp_path, cache_dir, "fail", [fail], round_deadline_s=600, liveness_timeout_s=300)
    procs, outs, elapsed = _plain_processes(config)
    assert [p.returncode for p in procs] == [1, 1, 1], [err[-1500:] for _, err in outs]
    assert "RuntimeError: boom in the training step of rank 1" in outs[1][1]  # the failed rank's own traceback
    for rank in (0, 2):  # the others: one line that names the failed rank, the round and the error
        stderr = outs[rank][1]
        assert "fedpeft: error: rank 1 failed in round 1: RuntimeError: boom in the training step" in stderr
        assert "Traceback" not in stderr, stderr[-2000:]
    assert elapsed < 120  # every process ended (communicate returned), long before any timeout
    assert [int(r["round"]) for r in _rounds(tmp_path, "fail")] == [0]


@pytest.mark.timeout(240)
def test_client_ranks_exit_with_one_line_when_the_server_is_killed(tmp_path: Path, cache_dir: str) -> None:
    kill = {"class_path": "dist_helpers.KillRank", "init_args": {"rank": 0, "round": 2, "batch": 0}}
    config = _config(tmp_path, cache_dir, "server_gone", [kill], liveness_timeout_s=300, wait_timeout_s=600)
    procs, outs, _ = _plain_processes(config, timeout=200)  # a client left waiting would hit the timeout
    assert procs[0].returncode == -9
    for rank in (1, 2):
        stderr = outs[rank][1]
        assert procs[rank].returncode == 1, stderr[-2000:]
        assert "fedpeft: error: rank" in stderr and "lost the server (rank 0) in round 2" in stderr, stderr[-2000:]
        assert "--ckpt_path last" in stderr and "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.timeout(300)
def test_edge_boards_in_real_mode_each_train_on_all_of_their_own_file(tmp_path: Path, cache_dir: str) -> None:
    # Three boards, three files of different sizes, each board told data.num_clients=1 (its file is its
    # client's data): every rank's client trains on all of its file, every round.
    sizes = (30, 45, 60)
    topics = ["sports", "food", "tech"]
    files = []
    for rank, n in enumerate(sizes):
        path = tmp_path / f"board{rank}.csv"
        path.write_text(
            "text,label\n" + "".join(f"board {rank} text {i} about {topics[i % 3]},{topics[i % 3]}\n" for i in range(n))
        )
        files.append(path)
    (tmp_path / "val.csv").write_text("text,label\n" + "".join(f"held out {t},{t}\n" for t in topics * 4))
    record = {"class_path": "dist_helpers.RecordOwnClients", "init_args": {"path": str(tmp_path / "own")}}
    config = _config(tmp_path, cache_dir, "boards", [record], mode="real", clients_per_round=3)
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"corpus": None, "val_file": str(tmp_path / "val.csv"), "num_clients": 1, "batch_size": 8}
    raw["data"] |= {"max_length": 32, "cache_dir": cache_dir}
    raw["trainer"]["max_epochs"] = 2
    config.write_text(yaml.safe_dump(raw))
    procs, outs, _ = _plain_processes(config, [[f"--data.train_file={f}"] for f in files])
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    for rank, n in enumerate(sizes):
        with open(tmp_path / f"own.rank{rank}.json") as fh:
            rounds = json.load(fh)
        assert rounds == {str(r): {str(rank): {"examples": n, "steps": -(-n // 8)}} for r in range(2)}, rounds
    rows = _rounds(tmp_path, "boards")
    assert [(int(r["round"]), int(r["clients"]), int(r["missing"])) for r in rows] == [(0, 3, 0), (1, 3, 0)]


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
    codec = Codec()
    endpoint = ServerEndpoint(server, codec, {"w": torch.zeros(2)}, 2, "simulation", 5, 5)
    endpoint.open_round(0)
    fetched = endpoint.fetch_round(1, 0)
    assert fetched is not None and len(fetched[0].client_ids) == 2
    mine, theirs = fetched[0].client_ids[0], endpoint.fetch_round(0, 0)[0].client_ids[0]

    def submit(rank: int, client: int) -> bool:
        return endpoint.submit(rank, codec.encode_update(ClientUpdate(client, 0, 5, {"w": torch.ones(2)})))

    assert not submit(1, theirs)  # not rank 1's client
    assert not submit(7, mine)  # no such rank
    assert submit(1, mine)
    record = endpoint.close_when_ready(0)  # the deadline (5 s) closes it: two clients never answer
    assert record.received == [mine] and theirs in record.rejected
    outcome = endpoint.publish(0)
    assert torch.equal(outcome.global_state["w"], torch.ones(2))
    assert endpoint.fetch_outcome(1, 0) == (outcome.global_state, False)
    assert not submit(1, mine)  # late: dropped


def test_the_endpoint_delivers_each_client_its_own_instructions() -> None:
    class PerClient(FedAvg):
        def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
            plan = super().configure_round(round_idx, num_clients)
            plan.instructions = {c: {"local_steps": 1 + c} for c in plan.client_ids}
            return plan

    server = FederatedServer(PerClient(4, seed=0), num_clients=8)
    server.initialize({"w": torch.zeros(2)})
    endpoint = ServerEndpoint(server, Codec(), {"w": torch.zeros(2)}, 2, "simulation", 5, 5)
    endpoint.open_round(0)
    for rank in (0, 1):
        ticket, _ = endpoint.fetch_round(rank, 0)
        assert sorted(ticket.instructions) == ticket.client_ids  # only its own clients' instructions
        assert all(told == {"local_steps": 1 + c} for c, told in ticket.instructions.items())


def test_a_reported_failure_stops_every_rank_with_its_reason() -> None:
    server = FederatedServer(FedAvg(2, seed=0), num_clients=4)
    server.initialize({"w": torch.zeros(2)})
    endpoint = ServerEndpoint(server, Codec(), {"w": torch.zeros(2)}, 3, "simulation", 5, 5)
    rung: list[str] = []
    endpoint.on_abort = rung.append
    endpoint.open_round(0)
    endpoint.abort("rank 2 failed in round 0: RuntimeError: boom", rank=2)
    assert rung == ["rank 2 failed in round 0: RuntimeError: boom"]  # rank 0's main thread is told
    for answer in (endpoint.heartbeat(1), endpoint.fetch_round(1, 0), endpoint.fetch_outcome(1, 0)):
        assert isinstance(answer, Aborted) and "rank 2 failed" in answer.reason
    assert endpoint.told == {1, 2} and endpoint.gone == set()
    with pytest.raises(FederationAborted, match="rank 2 failed in round 0"):
        endpoint.close_when_ready(0)
    endpoint.goodbye(1)
    endpoint.goodbye(2)
    start = time.monotonic()
    endpoint.wait_for_goodbyes(timeout_s=30)  # both said goodbye: the server may go at once
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("answer", ["accepted", "aborted", "server gone"])
def test_a_client_rank_trains_on_while_its_upload_is_checked(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A client rank's submit returns before the server has answered; the round's end waits for the answer."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    upload: torch.futures.Future = torch.futures.Future()
    polled_after_upload: list[bool] = []

    def rpc_sync(to: str, fn: object, args: tuple = (), timeout: float = 0) -> object:
        polled_after_upload.append(upload.done())
        return None, False  # the round's outcome, without its state

    monkeypatch.setattr(torch_rpc, "rpc_async", lambda to, fn, args=(), timeout=0: upload)
    monkeypatch.setattr(torch_rpc, "rpc_sync", rpc_sync)
    launcher = RPCLauncher()
    assert launcher.submit(ClientUpdate(3, 0, 5, {"w": torch.ones(2)})) is True
    assert not upload.done(), "submit waited for the server's answer"

    def reply() -> None:
        time.sleep(0.2)
        if answer == "server gone":
            upload.set_exception(RuntimeError("eof (this error originated at tensorpipe/transport/uv)"))
        else:
            upload.set_result(True if answer == "accepted" else Aborted("rank 0 failed: boom"))

    threading.Thread(target=reply).start()
    if answer == "accepted":
        outcome = launcher.finish_round(0, state_needed=False)
        assert outcome.global_state == {} and not outcome.final
        assert polled_after_upload == [True], "the outcome was asked for before the upload arrived"
        assert launcher.rpc_seconds >= 0.15  # the wait for the upload counts as transfer time; the poll not
    else:
        with pytest.raises(FederationAborted, match="boom" if answer == "aborted" else "lost the server"):
            launcher.finish_round(0, state_needed=False)
        assert polled_after_upload == []
