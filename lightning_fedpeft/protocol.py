"""The messages of one federated round, whatever carries them (a direct call, or torch.distributed RPC).

A round: the server's strategy makes a :class:`RoundPlan` (who trains, with which per-client
instructions); each process gets a :class:`RoundTicket` (its clients, their instructions, the global
state); every client answers with a :class:`ClientUpdate`; the server keeps a :class:`RoundRecord` of
what it saw, and every process ends the round with a :class:`RoundOutcome` (the new global state, and
whether the run ends with it). On the client side, an algorithm's hooks are told a :class:`ClientContext`
and answer with a :class:`ClientResult`. Only plain data: tensors, numbers, strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TrainableState = dict[str, torch.Tensor]
Instructions = dict[str, Any]  # per-client settings from the plan (e.g. local_steps, an adapter configuration)


@dataclass
class RoundPlan:
    """What the server's strategy decided for one round: who trains, and what each of them is told."""

    round: int
    client_ids: list[int]
    instructions: dict[int, Instructions] = field(default_factory=dict)


@dataclass
class RoundTicket:
    """What a process gets when a round opens: the clients it trains, their instructions, the global state."""

    round: int
    client_ids: list[int]
    global_state: TrainableState
    instructions: dict[int, Instructions] = field(default_factory=dict)
    wire_bytes: int = 0  # what the global state took on the wire (after the transport's encoding)


@dataclass
class ClientUpdate:
    """What one client returns at the end of its local training in a round.

    ``state`` is the model's trainable state; ``tensors`` are what the client's algorithms send beside it
    (e.g. FedARA's importance per triplet): they travel and count in the round's bytes, but are not part
    of the model. ``metrics`` are numbers to log.
    """

    client_id: int
    round: int
    num_examples: int
    state: TrainableState
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: TrainableState = field(default_factory=dict)


@dataclass
class RoundRecord:
    """What the server saw in one round, and what the strategy and the transport log with it."""

    round: int
    participants: list[int]
    received: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # numbers the strategy and the transport log
    bytes_down: int = 0
    bytes_up: int = 0
    wire_bytes_down: int = 0  # the same after the transport's encoding (int8 compression)
    wire_bytes_up: int = 0
    sim_round_s: float = 0.0  # simulated duration: the slowest accepted client (with a cost model)
    sim_time_s: float = 0.0  # the simulated clock after this round
    final: bool = False  # the server's stop rule ended the run with this round

    @property
    def missing(self) -> list[int]:
        return [c for c in self.participants if c not in self.received and c not in self.rejected]


@dataclass
class RoundOutcome:
    """How a round ends for every process: the new global state, and whether the run ends with it."""

    round: int
    global_state: TrainableState
    final: bool = False
    record: RoundRecord | None = None  # on the process that hosts the server only


@dataclass(frozen=True)
class ClientContext:
    """What a client's algorithm hooks are told: which round and client, what the plan says, where it started."""

    round: int
    client_id: int
    num_examples: int
    instructions: Instructions
    global_state: TrainableState  # the state as this client received it (after the transport's decoding)


@dataclass
class ClientResult:
    """What an algorithm's client half adds to a client's update."""

    tensors: TrainableState = field(default_factory=dict)  # travel with the update, counted in its bytes
    metrics: dict[str, float] = field(default_factory=dict)  # logged: their mean over the round's clients
