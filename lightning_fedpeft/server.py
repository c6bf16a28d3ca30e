"""The server half of the round protocol, shared by the one-process simulator and multi-rank runtimes.

A round: :meth:`FederatedServer.open_round` (the strategy picks participants), clients fetch the global
state and :meth:`submit` their updates, :meth:`close_round` aggregates whatever valid updates arrived
and records who was missing. Updates are checked before they are accepted: the right round, an expected
client, the global state's names and shapes, and finite values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_fedpeft.state import TrainableState, state_nbytes
from lightning_fedpeft.strategy import ClientUpdate, RoundPlan, Strategy

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What the server saw in one round."""

    round: int
    participants: list[int]
    received: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)  # what a launcher or algorithm adds to the log
    bytes_down: int = 0
    bytes_up: int = 0
    final: bool = False  # the server's stop rule ended the run with this round

    @property
    def missing(self) -> list[int]:
        return [c for c in self.participants if c not in self.received and c not in self.rejected]


class FederatedServer:
    """Holds the global trainable state and runs rounds with a :class:`Strategy`.

    ``stop_rule``, if given, is asked about every closed round's record; ``True`` marks the record
    ``final``: the run ends after that round (e.g. RoundSync's simulated-time budget).
    """

    def __init__(
        self, strategy: Strategy, num_clients: int, stop_rule: Callable[[RoundRecord], bool] | None = None
    ) -> None:
        self.strategy = strategy
        self.num_clients = num_clients
        self.stop_rule = stop_rule
        self.global_state: TrainableState = {}
        self.plan: RoundPlan | None = None
        self.record: RoundRecord | None = None
        self._updates: list[ClientUpdate] = []

    def initialize(self, state: TrainableState) -> None:
        """Set the starting global state (a copy is kept)."""
        self.global_state = {k: v.detach().clone() for k, v in state.items()}

    def open_round(self, round_idx: int) -> RoundPlan:
        """Ask the strategy for this round's participants and start accepting their updates."""
        if not self.global_state:
            raise RuntimeError("FederatedServer.initialize must be called before the first round")
        self.plan = self.strategy.configure_round(round_idx, self.num_clients)
        self.record = RoundRecord(round=round_idx, participants=list(self.plan.client_ids))
        # Every participant starts from the global state: counted once per client, as each would fetch it
        # in a real federation (ranks that host several simulated clients fetch it once on the wire).
        self.record.bytes_down = len(self.plan.client_ids) * state_nbytes(self.global_state)
        self._updates = []
        return self.plan

    @property
    def round_is_open(self) -> bool:
        return self.plan is not None

    def outstanding(self) -> list[int]:
        """Participants of the open round that have neither an accepted nor a rejected update yet."""
        return [] if self.record is None or self.plan is None else self.record.missing

    def submit(self, update: ClientUpdate) -> bool:
        """Accept a client's update if it is valid for the open round; return whether it was accepted."""
        reason = self._check(update)
        if reason is not None:
            same_round = self.record is not None and update.round == self.record.round
            if same_round and self.plan is None:
                # The round was already closed: the client stays "missing", the update is only noted as late.
                self.record.late.append(update.client_id)
            elif same_round and update.client_id in self.record.participants:
                self.record.rejected[update.client_id] = reason
            log.warning("round %s: rejected update from client %s: %s", update.round, update.client_id, reason)
            return False
        assert self.record is not None
        self.record.received.append(update.client_id)
        self.record.client_metrics[update.client_id] = dict(update.metrics)
        self.record.bytes_up += state_nbytes(update.state) + state_nbytes(update.extras)
        self._updates.append(update)
        return True

    def _check(self, update: ClientUpdate) -> str | None:
        if self.plan is None or self.record is None or update.round != self.record.round:
            return f"round {update.round} is not open (late or early update)"
        if update.client_id not in self.record.participants:
            return f"client {update.client_id} is not a participant of round {update.round}"
        if update.client_id in self.record.received:
            return "duplicate update"
        if set(update.state) != set(self.global_state):
            return "tensor names differ from the global state"
        for name, ref in self.global_state.items():
            tensor = update.state[name]
            if tuple(tensor.shape) != tuple(ref.shape):
                return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            if not torch.isfinite(tensor).all():
                return f"{name} has non-finite values"
        if not (update.num_examples > 0 and math.isfinite(update.num_examples)):
            return f"num_examples={update.num_examples} is not a positive count"
        for name, tensor in update.extras.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return f"extra {name} has non-finite values"
        return self.strategy.check_update(update)

    def close_round(self) -> TrainableState:
        """Aggregate the accepted updates into the new global state and close the round."""
        assert self.record is not None and self.plan is not None, "no open round"
        if self.record.missing:
            log.warning("round %s closed without clients %s", self.record.round, self.record.missing)
        # In client-id order, so the result does not depend on which process finished first.
        updates = sorted(self._updates, key=lambda u: u.client_id)
        self.global_state = self.strategy.aggregate(self.record.round, self.global_state, updates)
        self.record.extras.update(self.strategy.round_extras())
        self.record.final = self.stop_rule is not None and self.stop_rule(self.record)
        self._updates = []
        self.plan = None
        return self.global_state
