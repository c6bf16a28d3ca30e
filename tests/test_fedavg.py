import math

import pytest
import torch

from lightning_fedpeft.protocol import ClientUpdate
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.strategy import FedAvg


def test_fedavg_matches_hand_computation_with_unequal_counts() -> None:
    glob = {"w": torch.zeros(2), "b": torch.zeros(1)}
    updates = [
        ClientUpdate(0, 0, 10, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}),
        ClientUpdate(1, 0, 30, {"w": torch.tensor([5.0, -2.0]), "b": torch.tensor([1.0])}),
        ClientUpdate(2, 0, 60, {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}),
    ]
    out = FedAvg(3).aggregate(0, glob, updates)
    # by hand: w = (10*[1,2] + 30*[5,-2] + 60*[0,1]) / 100 = [1.6, 0.2]; b = (30 + 30 - 60) / 100 = 0.0
    assert torch.allclose(out["w"], torch.tensor([1.6, 0.2]))
    assert torch.allclose(out["b"], torch.tensor([0.0]))
    assert out["w"].dtype == glob["w"].dtype


def test_fedavg_without_updates_keeps_the_global_state() -> None:
    glob = {"w": torch.ones(3)}
    out = FedAvg(2).aggregate(0, glob, [])
    assert torch.equal(out["w"], glob["w"]) and out["w"] is not glob["w"]


def test_configure_round_samples_distinct_clients_reproducibly() -> None:
    s = FedAvg(4, seed=1)
    a, b = s.configure_round(7, 10), s.configure_round(7, 10)
    assert a.client_ids == b.client_ids and len(set(a.client_ids)) == 4
    assert all(0 <= c < 10 for c in a.client_ids)
    assert any(s.configure_round(r, 10).client_ids != a.client_ids for r in range(8))
    with pytest.raises(ValueError, match="clients_per_round"):
        s.configure_round(0, 3)


def _server() -> tuple[FederatedServer, list[int]]:
    server = FederatedServer(FedAvg(2, seed=0), num_clients=5)
    server.initialize({"w": torch.zeros(2, 2)})
    plan = server.open_round(0)
    return server, plan.client_ids


def test_server_rejects_bad_updates_and_completes_the_round() -> None:
    server, (a, b) = _server()
    outsider = next(c for c in range(5) if c not in (a, b))
    assert not server.submit(ClientUpdate(a, 0, 4, {"w": torch.full((2, 2), math.nan)}))
    assert not server.submit(ClientUpdate(b, 0, 4, {"w": torch.zeros(3)}))
    assert not server.submit(ClientUpdate(outsider, 0, 4, {"w": torch.ones(2, 2)}))
    assert not server.submit(ClientUpdate(b, 0, 4, {"v": torch.ones(2, 2)}))
    assert server.submit(ClientUpdate(b, 0, 4, {"w": torch.ones(2, 2)}))
    assert not server.submit(ClientUpdate(b, 0, 4, {"w": torch.ones(2, 2)})), "duplicate accepted"
    server.close_round()
    new = server.finish_round().global_state
    assert torch.equal(new["w"], torch.ones(2, 2)), "only the valid update is averaged"
    assert "non-finite" in server.record.rejected[a]
    assert server.record.received == [b]
    assert server.record.bytes_up == 16


def test_server_drops_late_updates() -> None:
    server, (a, b) = _server()
    server.submit(ClientUpdate(a, 0, 1, {"w": torch.ones(2, 2)}))
    server.close_round()
    assert not server.submit(ClientUpdate(b, 0, 1, {"w": torch.full((2, 2), 9.0)}))
    assert torch.equal(server.global_state["w"], torch.ones(2, 2))
    assert server.record.missing == [b]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (torch.tensor([[math.inf, 0.0], [0.0, 0.0]]), "non-finite"),
        (torch.tensor([[0.0, -math.inf], [0.0, 0.0]]), "non-finite"),
        # finite, but 3e38 - (-3e38) overflows float32: refused by the change bound, not called non-finite
        (torch.full((2, 2), 3e38), "moves the state by inf"),
    ],
)
def test_server_names_why_an_extreme_update_is_refused(values: torch.Tensor, reason: str) -> None:
    server = FederatedServer(FedAvg(1, seed=0), num_clients=2)
    server.initialize({"w": torch.full((2, 2), -3e38), "steps": torch.zeros(1, dtype=torch.long)})
    (client,) = server.open_round(0).client_ids
    update = {"w": values, "steps": torch.ones(1, dtype=torch.long)}
    assert not server.submit(ClientUpdate(client, 0, 1, update))
    assert reason in server.record.rejected[client]


def test_server_accepts_an_integer_tensor_in_the_state() -> None:
    server = FederatedServer(FedAvg(1, seed=0), num_clients=2)
    server.initialize({"w": torch.zeros(2), "steps": torch.zeros(1, dtype=torch.long)})
    (client,) = server.open_round(0).client_ids
    assert server.submit(ClientUpdate(client, 0, 1, {"w": torch.ones(2), "steps": torch.full((1,), 5)}))


def test_server_accepts_a_float16_update_whose_difference_leaves_float16s_range() -> None:
    # 60000 - (-60000) is inf in float16, but the change (norm 2.4e5) is within 1e4 x the state's norm (1.2e5).
    server = FederatedServer(FedAvg(1, seed=0), num_clients=2)
    server.initialize({"w": torch.full((2, 2), -60000.0, dtype=torch.float16)})
    (client,) = server.open_round(0).client_ids
    update = {"w": torch.full((2, 2), 60000.0, dtype=torch.float16)}
    assert server.submit(ClientUpdate(client, 0, 1, update)), server.record.rejected
