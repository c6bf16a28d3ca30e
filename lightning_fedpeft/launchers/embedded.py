"""The embedded (one-process) launcher: this process is the server and hosts every simulated client."""

from __future__ import annotations

from lightning_fedpeft.launchers.base import RoundChannel, RoundTicket
from lightning_fedpeft.server import FederatedServer, RoundRecord
from lightning_fedpeft.state import TrainableState
from lightning_fedpeft.strategy import ClientUpdate, Strategy


class EmbeddedLauncher(RoundChannel):
    """Server and all clients in this process; the server is called directly, nothing is serialized."""

    def __init__(self) -> None:
        self.server: FederatedServer | None = None

    def start(self, strategy: Strategy, num_clients: int, initial_state: TrainableState) -> None:
        self.server = FederatedServer(strategy, num_clients, self.stop_rule)
        self.server.initialize(initial_state)

    def begin_round(self, round_idx: int) -> RoundTicket:
        assert self.server is not None, "start() first"
        plan = self.server.open_round(round_idx)
        return RoundTicket(round_idx, list(plan.client_ids), self.server.global_state, plan.instructions)

    def submit(self, update: ClientUpdate) -> bool:
        assert self.server is not None
        return self.server.submit(update)

    def end_round(self, round_idx: int) -> tuple[TrainableState, RoundRecord | None]:
        assert self.server is not None
        state = self.server.close_round()
        record = self.server.record
        assert record is not None
        if record.final:
            self.final_round = round_idx
        return state, record
