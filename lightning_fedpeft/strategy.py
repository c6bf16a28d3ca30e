"""Server strategies: what the server asks of clients kept apart from what it does with their replies.

The split follows Flower's ``Strategy``: :meth:`Strategy.configure_round` picks the participants of a
round and what each is told (its instructions), :meth:`Strategy.aggregate` turns their updates into the
next global state. A strategy is plain Python and torch: it never sees Lightning, a model, a process or
a transport, so the one-process simulator and the multi-rank runtime share it, and its whole state
(:meth:`Strategy.state_dict`) rides in RoundSync's checkpoints.

What a strategy cannot work out from tensors alone (a state's validation accuracy, the cost of a
configuration) it asks as a :class:`Query`; the algorithm that built the strategy answers on the server's
process between rounds (:meth:`Strategy.queries`, :meth:`Strategy.answer`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from lightning_fedpeft.aggregation import Aggregator, Held, ServerOptimizer, WeightedMean
from lightning_fedpeft.protocol import ClientUpdate, RoundPlan, TrainableState
from lightning_fedpeft.seeds import SEED_SCALE, derived_seed


class Query:
    """A question about the model that a strategy needs answered before the next round.

    Subclasses are plain dataclasses defined beside the strategy that asks them; the
    :class:`~lightning_fedpeft.algorithm.FederatedAlgorithm` that built the strategy answers them.
    """


class Strategy:
    """Base class of server strategies. Subclasses override :meth:`aggregate`, and any of the other hooks.

    The server calls, per round: :meth:`configure_round`; :meth:`check_update` for every update;
    :meth:`aggregate`; :meth:`advance_clock` with the round's simulated seconds; then, until there are none,
    :meth:`queries` and :meth:`answer`; and last :meth:`round_metrics` and :meth:`may_stop`.
    """

    def __init__(self, clients_per_round: int, seed: int = 0) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.sim_time_s = 0.0  # the simulated clock (seconds); only moves with a cost model

    # -- before the first round ------------------------------------------------------------------------
    def validate(self, num_clients: int) -> None:
        """Raise ``ValueError`` naming the setting if rounds cannot be formed from ``num_clients`` clients."""
        if self.clients_per_round > num_clients:
            raise ValueError(
                f"federation.clients_per_round={self.clients_per_round} exceeds the {num_clients} clients "
                f"(data.num_clients); set clients_per_round to at most {num_clients}"
            )

    def initialize(self, global_state: TrainableState) -> None:
        """The run's starting global state (also after a resume, once :meth:`load_state_dict` has run)."""

    # -- configure ---------------------------------------------------------------------------------------
    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        """Sample ``clients_per_round`` distinct clients uniformly without replacement, with no instructions.

        The sample depends only on ``(seed, round_idx)``, so a resumed run or another process draws the
        same participants for the same round.
        """
        self.validate(num_clients)
        gen = torch.Generator().manual_seed(derived_seed(self.seed, round_idx, scales=(SEED_SCALE, 1)))
        chosen = torch.randperm(num_clients, generator=gen)[: self.clients_per_round]
        return RoundPlan(round=round_idx, client_ids=sorted(chosen.tolist()))

    # -- aggregate ---------------------------------------------------------------------------------------
    def check_update(self, update: ClientUpdate) -> str | None:
        """Why ``update`` must be rejected beyond the server's own checks (e.g. its ``tensors``), or ``None``."""
        return None

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        """Combine the accepted client updates (in client-id order) into the next global state."""
        raise NotImplementedError

    def transfer_share(self, client_id: int) -> float:
        """The share of the state's elements client ``client_id`` sends back this round (1.0: all of it).

        A strategy that has clients train part of the state (a fleet's prefixes and ranks) returns the part's
        share: the simulated clock counts only that part up, as a server would take only it; down too, unless
        :meth:`download_share` says the client needs more.
        """
        return 1.0

    def download_share(self, client_id: int) -> float:
        """The share of the state's elements client ``client_id`` must receive this round: what its local
        steps run, trained or not (default: :meth:`transfer_share`, for clients that run only what they train).
        """
        return self.transfer_share(client_id)

    def advance_clock(self, round_s: float) -> None:
        """Count the round just aggregated, which took ``round_s`` simulated seconds (its slowest client)."""
        self.sim_time_s += round_s

    def queries(self) -> list[Query]:
        """Questions about the model to answer before the next round (default: none)."""
        return []

    def answer(self, query: Query, value: Any) -> TrainableState | None:
        """Take the answer to one of :meth:`queries`; return a new global state if it changes it."""
        raise NotImplementedError(f"{type(self).__name__} asked no query it can take an answer to: {query!r}")

    # -- what the round leaves behind --------------------------------------------------------------------
    def round_metrics(self) -> dict[str, float]:
        """Numbers to log with the round just closed (they join its row in ``rounds.csv``)."""
        return {}

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Further tables to keep beside ``rounds.csv``, as ``{name: rows}`` (``name.csv``); default none."""
        return {}

    def use_aggregator(self, aggregator: Aggregator) -> None:
        """Combine updates with ``aggregator`` (``federation.aggregator``); ``ValueError`` if this strategy cannot."""
        raise ValueError(f"{type(self).__name__} takes no federation.aggregator; leave it unset")

    def use_server_optimizer(self, optimizer: ServerOptimizer) -> None:
        """Step with ``optimizer`` from the combined state (``federation.server_optimizer``), or ``ValueError``."""
        raise ValueError(f"{type(self).__name__} takes no federation.server_optimizer; leave it unset")

    def stop_reason(self) -> str | None:
        """Why the run must end after the round just closed (e.g. a privacy budget spent), or ``None``."""
        return None

    def may_stop(self) -> bool:
        """Whether a run may end after the round just closed (e.g. on a simulated-time budget).

        A strategy whose work spans several rounds (FedAdapter's trial groups) says no in the middle of it,
        so that a stop never throws away trials whose outcome was not decided yet.
        """
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run (subclasses add theirs to this)."""
        return {"sim_time_s": self.sim_time_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim_time_s = float(state["sim_time_s"])


class FedAvg(Strategy):
    """Federated averaging (McMahan et al., 2017) over the trainable state only.

    By default the sample-weighted mean ``sum_k n_k * w_k / sum_k n_k`` where ``n_k`` is client k's
    number of training examples, accumulated in float64. Another combination (a robust rule, DP noise)
    and a server optimizer can be plugged in (:mod:`lightning_fedpeft.aggregation`). With no updates
    (every participant failed) the global state is kept.
    """

    def __init__(self, clients_per_round: int, seed: int = 0) -> None:
        super().__init__(clients_per_round, seed)
        self.aggregator: Aggregator = WeightedMean()
        self.server_optimizer: ServerOptimizer | None = None

    def use_aggregator(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    def use_server_optimizer(self, optimizer: ServerOptimizer) -> None:
        self.server_optimizer = optimizer

    def validate(self, num_clients: int) -> None:
        super().validate(num_clients)
        if self.combines_parts() and not _takes_held(self.aggregator):
            raise ValueError(_NO_HELD.format(name=type(self.aggregator).__name__))
        self.aggregator.bind(self.clients_per_round, num_clients, self.seed)

    def combines_parts(self) -> bool:
        """Whether this strategy may combine clients that trained parts of the state (``held`` masks): its
        aggregator must then take them, which :meth:`validate` checks before any round."""
        return False

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        return self.combine(round_idx, global_state, updates)

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        """The aggregator's combination (each client on its ``held`` coordinates, if given), then the server
        optimizer's step; the global state as it is when there is no update."""
        if not updates:
            return {k: v.clone() for k, v in global_state.items()}
        if held is None:  # an aggregator of the user's own, written before held masks, still fits here
            combined = self.aggregator.combine(round_idx, global_state, updates)
        elif not _takes_held(self.aggregator):
            raise ValueError(_NO_HELD.format(name=type(self.aggregator).__name__))
        else:
            combined = self.aggregator.combine(round_idx, global_state, updates, held)
        if self.server_optimizer is not None:
            combined = self.server_optimizer.step(global_state, combined)
        return combined

    def round_metrics(self) -> dict[str, float]:
        return self.aggregator.metrics()

    def stop_reason(self) -> str | None:
        return self.aggregator.stop_reason()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict() | {"aggregator": self.aggregator.state_dict()}
        if self.server_optimizer is not None:
            state["server_optimizer"] = self.server_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        if self.server_optimizer is not None and "server_optimizer" in state:
            self.server_optimizer.load_state_dict(state["server_optimizer"])


_NO_HELD = (
    "federation.aggregator={name} cannot combine clients that trained parts of the state (a fleet's per-client "
    "configurations): give its combine() a held=None parameter (lightning_fedpeft.aggregation.Aggregator)"
)


def _takes_held(aggregator: Aggregator) -> bool:
    # An aggregator of the user's own, written before held masks, has no such parameter.
    return "held" in inspect.signature(aggregator.combine).parameters
