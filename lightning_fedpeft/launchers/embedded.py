"""The embedded (one-process) launcher: this process is the server and hosts every simulated client."""

from __future__ import annotations

from lightning_fedpeft.launchers.base import RoundChannel
from lightning_fedpeft.protocol import ClientUpdate, RoundOutcome, RoundRecord, RoundTicket, TrainableState
from lightning_fedpeft.server import FederatedServer


class EmbeddedLauncher(RoundChannel):
    """Server and all clients in this process; the server is called directly, nothing is serialized.

    States still pass through the codec (encode, then decode) so that compression behaves as on a wire.
    """

    def start(self, server: FederatedServer | None, reference: TrainableState, first_round: int = 0) -> int:
        if server is None:
            raise ValueError("EmbeddedLauncher hosts the server: start() needs one")
        self.server = server
        self._reference = reference
        self._sent: TrainableState = {}
        return first_round

    def begin_round(self, round_idx: int) -> RoundTicket:
        assert self.server is not None, "start() first"
        wire = self.codec.encode(self.server.global_state, self._reference)
        self._sent = self.codec.decode(wire, self._reference)  # what every client of the round receives
        plan = self.server.open_round(round_idx, wire.nbytes)
        return RoundTicket(round_idx, list(plan.client_ids), self._sent, plan.instructions, wire.nbytes)

    def submit(self, update: ClientUpdate) -> bool:
        assert self.server is not None
        wire = self.codec.encode_update(update, self._sent)
        return self.server.submit(self.codec.decode_update(wire, self._sent), wire.nbytes)

    def close_round(self, round_idx: int) -> RoundRecord | None:
        assert self.server is not None
        return self.server.close_round()

    def finish_round(self, round_idx: int, state_needed: bool = True) -> RoundOutcome:
        assert self.server is not None
        return self.server.finish_round()
