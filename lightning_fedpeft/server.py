"""The server half of the round protocol, shared by the one-process simulator and multi-rank runtimes.

A round: :meth:`FederatedServer.open_round` (the strategy picks participants and their instructions),
clients fetch the global state and :meth:`~FederatedServer.submit` their updates,
:meth:`~FederatedServer.close_round` aggregates whatever valid updates arrived and records who was
missing, the strategy's :meth:`~FederatedServer.queries` are answered on this process, and
:meth:`~FederatedServer.finish_round` publishes the outcome. Updates are checked before they are
accepted: the right round, an expected client, the global state's names and shapes, finite values.

The server owns the simulated clock's stop rule: with ``max_sim_hours``, the round at which the
strategy's clock reaches the budget (and the strategy may stop) is final, on every process alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.protocol import ClientUpdate, RoundOutcome, RoundPlan, RoundRecord, TrainableState
from lightning_fedpeft.state import state_nbytes
from lightning_fedpeft.strategy import Query, Strategy

log = logging.getLogger(__name__)

MAX_CHANGE = 1e4  # an update may move the global state by at most this many times the state's norm


class FederatedServer:
    """Holds the global trainable state and runs rounds with a :class:`Strategy`.

    Args:
        strategy: the server strategy.
        num_clients: how many clients there are to sample from.
        cost_model: if set, each accepted client's simulated round is its reported ``sim_compute_s`` plus
            the transfer of what it downloaded and uploaded (the sizes on the wire) at the model's
            bandwidth; the round lasts as long as its slowest client, and the strategy's clock advances.
        max_sim_hours: if set, the round whose clock reaches this many hours is final (see the module).
    """

    def __init__(
        self,
        strategy: Strategy,
        num_clients: int,
        cost_model: CostModel | None = None,
        max_sim_hours: float | None = None,
    ) -> None:
        self.check_budget(max_sim_hours, cost_model)
        self.strategy = strategy
        self.num_clients = num_clients
        self.cost_model = cost_model
        self.max_sim_hours = max_sim_hours
        self.global_state: TrainableState = {}
        self.plan: RoundPlan | None = None
        self.record: RoundRecord | None = None
        self._updates: list[ClientUpdate] = []
        self._sim_seconds: dict[int, float] = {}
        self._state_norm = 0.0  # the open round's global state's L2 norm (the change limit's scale)

    @staticmethod
    def check_budget(max_sim_hours: float | None, cost_model: CostModel | None) -> None:
        """Raise ``ValueError`` naming the setting if ``max_sim_hours`` cannot be a budget."""
        if max_sim_hours is None:
            return
        if cost_model is None:
            raise ValueError(
                "federation.max_sim_hours needs a simulated clock: set federation.cost_model (e.g. "
                "{class_path: lightning_fedpeft.cost.CostModel, init_args: {device: tx2}}) or drop max_sim_hours"
            )
        if not (math.isfinite(max_sim_hours) and max_sim_hours > 0):
            raise ValueError(f"federation.max_sim_hours={max_sim_hours} must be a positive number of hours")

    def initialize(self, state: TrainableState) -> None:
        """Set the starting global state (a copy is kept) and tell the strategy."""
        self.global_state = {k: v.detach().clone() for k, v in state.items()}
        self.strategy.initialize(self.global_state)

    def open_round(self, round_idx: int, wire_bytes_down: int | None = None) -> RoundPlan:
        """Ask the strategy for this round's plan and start accepting its participants' updates.

        ``wire_bytes_down``: what the global state takes on the wire (default: its size as it is).
        """
        if not self.global_state:
            raise RuntimeError("FederatedServer.initialize must be called before the first round")
        self.plan = self.strategy.configure_round(round_idx, self.num_clients)
        self.record = RoundRecord(round=round_idx, participants=list(self.plan.client_ids))
        # Every participant starts from the global state: counted once per client, as each would fetch it
        # in a real federation (ranks that host several simulated clients fetch it once on the wire).
        nbytes = state_nbytes(self.global_state)
        self._wire_down = nbytes if wire_bytes_down is None else wire_bytes_down
        self.record.bytes_down = len(self.plan.client_ids) * nbytes
        self.record.wire_bytes_down = len(self.plan.client_ids) * self._wire_down
        self._updates = []
        self._sim_seconds = {}
        # The state every update of the round is measured against does not change until the round closes.
        self._state_norm = math.sqrt(sum(_norm(t) ** 2 for t in self.global_state.values()))
        return self.plan

    def outstanding(self) -> list[int]:
        """Participants of the open round that have neither an accepted nor a rejected update yet."""
        return [] if self.record is None or self.plan is None else self.record.missing

    def submit(self, update: ClientUpdate, wire_bytes: int | None = None) -> bool:
        """Accept a client's update if it is valid for the open round; return whether it was accepted.

        ``wire_bytes``: what the update's state took on the wire (default: its size as it is).
        """
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
        up = state_nbytes(update.state) if wire_bytes is None else wire_bytes
        self.record.received.append(update.client_id)
        self.record.client_metrics[update.client_id] = dict(update.metrics)
        self.record.bytes_up += state_nbytes(update.state) + state_nbytes(update.tensors)
        self.record.wire_bytes_up += up
        compute = update.metrics.get("sim_compute_s")
        if self.cost_model is not None and compute is not None:
            # A fleet client's part of the state: what its local steps run comes down, what it trained goes up.
            down = self._wire_down * self.strategy.download_share(update.client_id)
            up_share = self.strategy.transfer_share(update.client_id)
            comm = self.cost_model.comm_seconds(down) + self.cost_model.comm_seconds(up * up_share)
            self._sim_seconds[update.client_id] = compute + comm
        self._updates.append(update)
        return True

    def reject(self, round_idx: int, client_id: int, reason: str) -> None:
        """Record that ``client_id``'s update for ``round_idx`` was refused before it reached :meth:`submit`
        (the transport found it came from the wrong sender); only a participant of the open round is noted."""
        log.warning("round %s: rejected update from client %s: %s", round_idx, client_id, reason)
        record = self.record
        if record is not None and round_idx == record.round and client_id in record.participants:
            record.rejected.setdefault(client_id, reason)

    def add_round_metrics(self, metrics: dict[str, float]) -> None:
        """Numbers the transport logs with the round just finished (e.g. the bytes RPC carried)."""
        assert self.record is not None, "no round to add metrics to"
        self.record.metrics.update(metrics)

    def _check(self, update: ClientUpdate) -> str | None:
        if self.plan is None or self.record is None or update.round != self.record.round:
            return f"round {update.round} is not open (late or early update)"
        if update.client_id not in self.record.participants:
            return f"client {update.client_id} is not a participant of round {update.round}"
        if update.client_id in self.record.received:
            return "duplicate update"
        count = update.num_examples
        if isinstance(count, bool) or not isinstance(count, int | float) or not (math.isfinite(count) and count > 0):
            return f"num_examples={count!r} is not a positive count"
        if not isinstance(update.state, dict) or not isinstance(update.tensors, dict):
            return "the state and the tensors beside it must be name -> tensor mappings"
        names, expected = set(update.state), set(self.global_state)
        if names != expected:
            missing, extra = sorted(expected - names)[:3], sorted(names - expected)[:3]
            return f"tensor names differ from the global state (missing {missing}, unexpected {extra})"
        change = 0.0
        for name, ref in self.global_state.items():
            tensor = update.state[name]
            if not isinstance(tensor, torch.Tensor):
                return f"{name} is a {type(tensor).__name__}, not a tensor"
            if tuple(tensor.shape) != tuple(ref.shape):
                return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            if tensor.dtype != ref.dtype:
                return f"{name} has dtype {tensor.dtype}, expected {ref.dtype}"
            # One pass per tensor: the difference's norm, accumulated in float64. A NaN or inf in the update
            # makes it non-finite (the global state is finite); only then is the tensor itself looked at, so
            # the reason names what is wrong. (Casting both sides to float64 first cost 5-6x as much as the
            # whole submit now, on one thread, under the endpoint's lock: bench/update_check.py.)
            norm = _diff_norm(tensor, ref)
            if not math.isfinite(norm):
                if not torch.isfinite(tensor).all():
                    return f"{name} has non-finite values"
                norm = math.inf  # finite values whose difference overflows: refused by the bound below
            change += norm * norm
        # A finite change can still be absurd (1e30): no honest local round moves the state by more than
        # MAX_CHANGE times its own size (a robust aggregator is the defence against subtler poisoning).
        scale = self._state_norm
        if not math.sqrt(change) <= MAX_CHANGE * max(1.0, scale):
            return f"the update moves the state by {math.sqrt(change):.3g}, over {MAX_CHANGE:g} x its norm {scale:.3g}"
        side = 0
        for name, tensor in update.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                return f"tensor {name} is a {type(tensor).__name__}, not a tensor"
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return f"tensor {name} has non-finite values"
            side += tensor.numel() * tensor.element_size()
        limit = max(state_nbytes(self.global_state), 2**20)  # what travels beside a state is smaller than it
        if side > limit:
            return f"the tensors beside the state take {side} bytes, over the {limit}-byte limit; refused as oversized"
        return self.strategy.check_update(update)

    def close_round(self) -> RoundRecord:
        """Aggregate the accepted updates into the new global state and stop accepting updates."""
        assert self.record is not None and self.plan is not None, "no open round"
        if self.record.missing:
            log.warning("round %s closed without clients %s", self.record.round, self.record.missing)
        # In client-id order, so the result does not depend on which process finished first.
        updates = sorted(self._updates, key=lambda u: u.client_id)
        self.global_state = self.strategy.aggregate(self.record.round, self.global_state, updates)
        self.record.sim_round_s = max(self._sim_seconds.values(), default=0.0)
        self.strategy.advance_clock(self.record.sim_round_s)
        self._updates = []
        self.plan = None
        return self.record

    def queries(self) -> list[Query]:
        """The strategy's open questions about the model (answer them before :meth:`finish_round`)."""
        return self.strategy.queries()

    def answer(self, query: Query, value: Any) -> None:
        """Hand an answer to the strategy; it may replace the global state."""
        state = self.strategy.answer(query, value)
        if state is not None:
            self.global_state = state

    def answer_all(self, answer: Callable[[Query], Any] | None) -> None:
        """Answer the strategy's questions with ``answer`` until it asks no more (between rounds)."""
        while queries := self.queries():
            if answer is None:
                raise RuntimeError(f"the strategy asks {queries[0]!r} but no algorithm callback answers it")
            for query in queries:
                self.answer(query, answer(query))

    def finish_round(self) -> RoundOutcome:
        """After the queries: what the round logs, whether it is final, and the state every client gets."""
        record = self.record
        assert record is not None and self.plan is None, "close_round first"
        if self.queries():
            raise RuntimeError(f"round {record.round}: the strategy's queries must be answered before it finishes")
        record.sim_time_s = self.strategy.sim_time_s
        record.metrics.update(self.strategy.round_metrics())
        budget_s = None if self.max_sim_hours is None else self.max_sim_hours * 3600.0
        clock_spent = budget_s is not None and record.sim_time_s >= budget_s
        reason = self.strategy.stop_reason()  # e.g. the next round would pass a privacy budget
        record.final = self.strategy.may_stop() and (clock_spent or reason is not None)
        if record.final and clock_spent:
            log.info(
                "round %d: simulated clock %.4f h reached federation.max_sim_hours=%s; the run ends",
                record.round,
                record.sim_time_s / 3600.0,
                self.max_sim_hours,
            )
        elif record.final:
            log.warning("round %d: the run ends: %s", record.round, reason)
        return RoundOutcome(record.round, self.global_state, record.final, record)


def _norm(tensor: torch.Tensor) -> float:
    """L2 norm of ``tensor``, accumulated in float64 without a float64 copy of a floating tensor."""
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def _diff_norm(tensor: torch.Tensor, ref: torch.Tensor) -> float:
    """L2 norm of ``tensor - ref``, the difference taken in their dtype and summed in float64."""
    if not tensor.is_floating_point():
        return _norm(tensor.to(torch.float64) - ref.to(torch.float64))
    if tensor.dtype == torch.float16:  # its range ends at 65504: two finite weights could differ by more
        return _norm(tensor.float() - ref.float())
    return _norm(tensor - ref)
