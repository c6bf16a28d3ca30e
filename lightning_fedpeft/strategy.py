"""Server strategies: what the server asks of clients kept apart from what it does with their replies.

The split follows Flower's ``Strategy``: :meth:`Strategy.configure_round` picks the participants of a
round (and may attach instructions for them), :meth:`Strategy.aggregate` turns their updates into the
next global state. Neither knows about Lightning, processes or transport, so the one-process simulator
and the multi-rank runtime can share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fedpeft.state import TrainableState


@dataclass
class ClientUpdate:
    """What one client returns at the end of its local training in a round."""

    client_id: int
    round: int
    num_examples: int
    state: TrainableState
    metrics: dict[str, float] = field(default_factory=dict)
    # Side tensors an algorithm sends with the update (e.g. FedARA's importance per triplet); they cross
    # the wire and are counted in the round's bytes, but they are not part of the model.
    extras: TrainableState = field(default_factory=dict)


@dataclass
class RoundPlan:
    """What the server decided for one round: who trains, and any per-client instructions."""

    round: int
    client_ids: list[int]
    instructions: dict[int, dict[str, Any]] = field(default_factory=dict)


class Strategy:
    """Base class of server strategies. Subclasses override :meth:`aggregate` (and maybe :meth:`configure_round`)."""

    def __init__(self, clients_per_round: int, seed: int = 0) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round
        self.seed = seed

    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        """Sample ``clients_per_round`` distinct clients uniformly without replacement.

        The sample depends only on ``(seed, round_idx)``, so a resumed run or another process draws the
        same participants for the same round.
        """
        if self.clients_per_round > num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds num_clients={num_clients}; "
                f"set clients_per_round to at most {num_clients}"
            )
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_idx)
        chosen = torch.randperm(num_clients, generator=gen)[: self.clients_per_round]
        return RoundPlan(round=round_idx, client_ids=sorted(chosen.tolist()))

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        """Combine client updates into the next global state."""
        raise NotImplementedError

    def check_update(self, update: ClientUpdate) -> str | None:
        """Why ``update`` must be rejected beyond the server's own checks (e.g. its ``extras``), or ``None``."""
        return None

    def round_extras(self) -> dict[str, float]:
        """Values to log with the round just aggregated (the server adds them to the round's record)."""
        return {}

    def may_stop(self) -> bool:
        """Whether a run may end after the round just aggregated (e.g. on a simulated-time budget).

        A strategy whose work spans several rounds (FedAdapter's trial groups) says no in the middle of it,
        so that a stop never throws away trials whose outcome was not decided yet.
        """
        return True


class FedAvg(Strategy):
    """Sample-weighted federated averaging (McMahan et al., 2017) over the trainable state only.

    The new global tensor is ``sum_k n_k * w_k / sum_k n_k`` where ``n_k`` is client k's number of
    training examples. With no updates (every participant failed) the global state is kept.
    """

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        if not updates:
            return {k: v.clone() for k, v in global_state.items()}
        total = sum(u.num_examples for u in updates)
        if total <= 0:
            raise ValueError("FedAvg needs at least one example among the updates")
        out: TrainableState = {}
        for name, ref in global_state.items():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for u in updates:
                acc += u.state[name].to(torch.float64) * (u.num_examples / total)
            out[name] = acc.to(ref.dtype)
        return out
