"""The round protocol between a process's clients and the server, whatever carries it.

``RoundSync`` (the client half, in every process) talks to the server only through a
:class:`RoundChannel`: ``begin_round`` (which of the round's clients this process trains, their
instructions, and the global state they start from), ``submit`` (one client's update), ``close_round``
(the server aggregates; only on the process that hosts it), ``answer_queries`` (that process answers
the strategy's questions about the model),
``finish_round`` (the new global state, and whether the run ends with it). States cross the channel
through its :class:`~lightning_fedpeft.launchers.codec.Codec` (``federation.compression``).
:class:`~lightning_fedpeft.launchers.embedded.EmbeddedLauncher` calls the server directly;
:class:`~lightning_fedpeft.launchers.rpc.RPCLauncher` carries the same calls over torch.distributed RPC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_fedpeft.launchers.codec import Codec
from lightning_fedpeft.protocol import ClientUpdate, RoundOutcome, RoundRecord, RoundTicket, TrainableState
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.strategy import Query


class FederationAborted(RuntimeError):
    """The federation stopped because a process failed; the message says which one and why."""


class RoundChannel:
    """Interface of a launcher: where the server lives, which clients this process hosts, how states travel."""

    rank: int = 0
    world_size: int = 1
    mode: str = "simulation"

    def __init__(self, compression: str = "none") -> None:
        self.codec = Codec(compression)
        self.server: FederatedServer | None = None  # set by start() on the process that hosts the server

    @property
    def is_server(self) -> bool:
        """Whether this process hosts the server (and so keeps the round records and logs)."""
        return self.rank == 0

    def check_round_size(self, clients_per_round: int) -> None:
        """Raise ``ValueError`` naming the setting if this transport cannot run rounds of that many clients."""

    def start(self, server: FederatedServer | None, reference: TrainableState, first_round: int = 0) -> int:
        """Connect. ``server`` (initialized) is hosted here if this is the server's process, else ignored.

        ``reference``: the run's starting state (what int8 downloads are differences from) and
        ``first_round``: the round to run next (above 0 in a resumed run), as this process knows them. The
        server's process is the authority: the others adopt its reference and return its first round, so
        that client processes restarted without the checkpoint join the resumed run where it is.
        """
        raise NotImplementedError

    def begin_round(self, round_idx: int) -> RoundTicket:
        """Open (server) or join (client processes) round ``round_idx``; the ticket's state is as received."""
        raise NotImplementedError

    def submit(self, update: ClientUpdate) -> bool:
        """Send one client's update; returns whether the server accepted it (``True`` if unknown yet)."""
        raise NotImplementedError

    def close_round(self, round_idx: int) -> RoundRecord | None:
        """On the server's process: wait for the round's updates and aggregate them. ``None`` elsewhere."""
        raise NotImplementedError

    def answer_queries(self, answer: Callable[[Query], Any] | None) -> None:
        """On the server's process: answer the strategy's questions about the model with ``answer`` (between
        ``close_round`` and ``finish_round``, and once at the start). Elsewhere nothing is asked."""
        if self.server is not None:
            self.server.answer_all(answer)

    def finish_round(self, round_idx: int, state_needed: bool = True) -> RoundOutcome:
        """The round's outcome: published by the server's process (after its queries), fetched by the others.

        ``state_needed=False``: a client process needs only whether the run ends (every client of the next
        round starts from that round's state); its outcome's ``global_state`` may then be empty, unless the
        run ends with this round.
        """
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """This process failed: tell the other processes (so they stop too) and release connections."""
        self.shutdown()

    def shutdown(self) -> None:
        """Release connections at the end of ``fit``."""
