"""The round protocol between a process's clients and the server, whatever carries it.

``RoundSync`` (the client half, in every process) talks to the server only through a
:class:`RoundChannel`: ``begin_round`` (which of the round's clients this process trains, and the
global state they start from), ``submit`` (one client's update), ``end_round`` (the new global state).
:class:`~lightning_fedpeft.launchers.embedded.EmbeddedLauncher` calls the server directly;
:class:`~lightning_fedpeft.launchers.rpc.RPCLauncher` carries the same calls over torch.distributed RPC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lightning_fedpeft.server import RoundRecord
from lightning_fedpeft.state import TrainableState
from lightning_fedpeft.strategy import ClientUpdate, Strategy


@dataclass
class RoundTicket:
    """What a process gets when a round opens: the clients it trains and their starting state."""

    round: int
    client_ids: list[int]
    global_state: TrainableState
    instructions: dict[int, dict] = field(default_factory=dict)


class RoundChannel:
    """Interface of a launcher: where the server lives and which clients this process hosts."""

    rank: int = 0
    world_size: int = 1
    # Set by RoundSync before start() and handed to the FederatedServer (see its ``stop_rule``); a final
    # round ends the run on every process (client processes learn it with the new global state).
    stop_rule: Callable[[RoundRecord], bool] | None = None
    # The round after which the server ended the run, once a process knows it (see ``stop_rule``).
    final_round: int | None = None

    @property
    def is_server(self) -> bool:
        """Whether this process hosts the server (and so keeps the round records and logs)."""
        return self.rank == 0

    def start(self, strategy: Strategy, num_clients: int, initial_state: TrainableState) -> None:
        """Connect; on the server side also set the starting global state."""
        raise NotImplementedError

    def begin_round(self, round_idx: int) -> RoundTicket:
        """Open (server) or join (client processes) round ``round_idx``."""
        raise NotImplementedError

    def submit(self, update: ClientUpdate) -> bool:
        """Send one client's update; returns whether the server accepted it (``True`` if unknown yet)."""
        raise NotImplementedError

    def end_round(self, round_idx: int) -> tuple[TrainableState, RoundRecord | None]:
        """Wait for the round to close; the new global state and, on the server, the round's record.

        If the server's ``stop_rule`` ended the run with this round, ``final_round`` is ``round_idx`` after it.
        """
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release connections at the end of ``fit``."""
