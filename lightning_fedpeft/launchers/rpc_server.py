"""The server's side of the RPC runtime, on rank 0: the endpoint the other ranks call, and rank 0's own role.

:class:`ServerEndpoint` is the server's thread-safe front: RPC threads (the client ranks' calls, through
the ``remote_*`` functions below) and rank 0's own training thread share it. It deals the round's clients
to ranks, keeps the ranks' liveness, closes a round at its deadline or when only silent ranks are left,
counts the bytes RPC carried, and stops the federation when a rank reports a failure. What the server
itself decides (is an update valid, the aggregate, the stop rule) stays in
:class:`~lightning_fedpeft.server.FederatedServer`; the endpoint reaches it only through its methods.
:class:`ServerSide` is rank 0's half of :class:`~lightning_fedpeft.launchers.rpc.RPCLauncher`: its own
clients call the endpoint directly, without RPC.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from lightning_fedpeft.launchers.alarm import MainThreadAlarm
from lightning_fedpeft.launchers.base import FederationAborted
from lightning_fedpeft.launchers.codec import Codec, WireState, WireUpdate
from lightning_fedpeft.launchers.settings import TransportConfig
from lightning_fedpeft.protocol import RoundOutcome, RoundRecord, RoundTicket, TrainableState
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import state_nbytes

log = logging.getLogger(__name__)

_ENDPOINT: ServerEndpoint | None = None  # set on rank 0 only; the RPC functions below call into it


@dataclass(frozen=True)
class Aborted:
    """What the endpoint answers every call with once the federation has stopped."""

    reason: str


@dataclass
class _RoundState:
    round: int
    assignment: dict[int, int]  # client id -> rank
    opened_at: float
    instructions: dict[int, dict]
    wire: WireState  # the global state as it goes to every client of the round
    sent: TrainableState  # ... and as they decode it (what their uploads are encoded against)
    outcome: RoundOutcome | None = None  # published once the server has finished the round


class ServerEndpoint:
    """Rank 0's thread-safe front of the server: RPC threads and rank 0's own training thread share it."""

    def __init__(
        self,
        server: FederatedServer,
        codec: Codec,
        reference: TrainableState,
        world_size: int,
        mode: str,
        round_deadline_s: float,
        liveness_timeout_s: float,
    ) -> None:
        self.server = server
        self.codec = codec
        self.reference = reference
        self.world_size = world_size
        self.mode = mode
        self.round_deadline_s = round_deadline_s
        self.liveness_timeout_s = liveness_timeout_s
        self.cond = threading.Condition()
        self.rounds: dict[int, _RoundState] = {}
        self.last_seen: dict[int, float] = {r: time.monotonic() for r in range(world_size)}
        self.rpc_bytes = {"up": 0, "down": 0}
        self._logged_bytes = {"up": 0, "down": 0}
        self.aborted: Aborted | None = None
        self.told: set[int] = set()  # ranks that have heard of the abort
        self.gone: set[int] = set()  # ranks that said goodbye: they make no more calls
        self.on_abort: Any = None  # called (in an RPC thread) when a client rank reports a failure
        self.first_round = 0  # the round the run starts (or, resumed, continues) with
        self.closing = False  # this process is closing its RPC agent: goodbyes need not linger

    def join(self, rank: int) -> tuple[int, TrainableState]:
        """What a client rank adopts when it connects: the first round, and the codec's reference if it has one."""
        with self.cond:
            self._touch(rank)
            return self.first_round, (self.reference if self.codec.compression != "none" else {})

    # -- liveness ------------------------------------------------------------------------------------
    def _touch(self, rank: int) -> Aborted | None:
        self.last_seen[rank] = time.monotonic()
        if self.aborted is not None:
            self.told.add(rank)
            self.cond.notify_all()
        return self.aborted

    def silent_ranks(self) -> set[int]:
        now = time.monotonic()
        return {r for r, t in self.last_seen.items() if r != 0 and now - t > self.liveness_timeout_s}

    def heartbeat(self, rank: int) -> Aborted | None:
        with self.cond:
            if not 0 <= rank < self.world_size:
                return None
            stop = self._touch(rank)
            self.cond.notify_all()
            return stop

    def abort(self, reason: str, rank: int | None = None) -> None:
        """Stop the federation: every later call from any rank is answered with the reason."""
        with self.cond:
            if self.aborted is None:
                self.aborted = Aborted(reason)
                log.error("the federation stops: %s", reason)
            if rank is not None:
                self.told.add(rank)
            self.cond.notify_all()
        if rank is not None and self.on_abort is not None:
            self.on_abort(reason)

    def goodbye(self, rank: int, linger_s: float = 0.0) -> None:
        """``rank`` has stopped (at the end of fit, or after an abort) and makes no more calls.

        With ``linger_s``, the answer waits (at most that long) until this process closes its own RPC
        agent too: a client rank whose agent went away earlier, while the server still evaluates and tests,
        would have TensorPipe print an ``EOF`` warning here for each client rank.
        """
        with self.cond:
            self.told.add(rank)
            self.gone.add(rank)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.closing, timeout=linger_s)

    def wait_for_goodbyes(self, timeout_s: float) -> None:
        """Before the server goes away: wait until every live rank has said goodbye (it calls no more).

        Nothing less will do: a rank whose request was handled may not have its reply yet (the final
        state, or the reason of an abort), and a server gone under it leaves it a raw transport error.
        """
        end = time.monotonic() + timeout_s
        with self.cond:
            while time.monotonic() < end:
                waiting = set(range(1, self.world_size)) - self.gone - self.silent_ranks()
                if not waiting:
                    return
                self.cond.wait(timeout=0.2)
            log.warning("ranks %s did not say goodbye before the server stopped", sorted(waiting))

    # -- the round -----------------------------------------------------------------------------------
    def open_round(self, round_idx: int) -> None:
        with self.cond:
            wire = self.codec.encode(self.server.global_state, self.reference)
            plan = self.server.open_round(round_idx, wire.nbytes)
            if self.mode == "real":
                assignment = {cid: cid for cid in plan.client_ids}
            else:
                ranks = [r for r in range(self.world_size) if r not in self.silent_ranks()]
                assignment = {cid: ranks[i % len(ranks)] for i, cid in enumerate(plan.client_ids)}
            sent = self.codec.decode(wire, self.reference)
            self.rounds[round_idx] = _RoundState(
                round_idx, assignment, time.monotonic(), dict(plan.instructions), wire, sent
            )
            self.rounds.pop(round_idx - 2, None)  # keep memory bounded; late callers of old rounds get None
            self.cond.notify_all()

    def fetch_round(self, rank: int, round_idx: int) -> tuple[RoundTicket, WireState] | Aborted | None:
        """The ticket of ``rank`` for ``round_idx`` (its state on the wire); ``None`` while not open yet."""
        with self.cond:
            if (stop := self._touch(rank)) is not None:
                return stop
            state = self.rounds.get(round_idx)
            if state is None or state.outcome is not None:
                return None
            mine = [cid for cid, r in state.assignment.items() if r == rank]
            if rank != 0:
                self.rpc_bytes["down"] += state.wire.nbytes
            instructions = {cid: state.instructions.get(cid, {}) for cid in mine}
            return RoundTicket(round_idx, mine, {}, instructions, state.wire.nbytes), state.wire

    def submit(self, rank: int, wire: WireUpdate) -> bool | Aborted:
        with self.cond:
            if (stop := self._touch(rank)) is not None:
                return stop
            bare = wire.update
            state = self.rounds.get(bare.round)
            expected = state.assignment.get(bare.client_id) if state is not None else None
            if not 0 <= rank < self.world_size or (expected is not None and expected != rank):
                reason = f"rank {rank} is not the rank assigned client {bare.client_id} (expected {expected})"
                self.server.reject(bare.round, bare.client_id, reason)
                self.cond.notify_all()
                return False
            if rank != 0:
                self.rpc_bytes["up"] += wire.nbytes
            # A round long gone has nothing to decode against; the server rejects the update as late.
            update = self.codec.decode_update(wire, state.sent) if state is not None else bare
            accepted = self.server.submit(update, wire.nbytes)
            self.cond.notify_all()
            return accepted

    def close_when_ready(self, round_idx: int) -> RoundRecord:
        """Block until every participant answered, the deadline passed, or only silent ranks are left."""
        with self.cond:
            state = self.rounds[round_idx]
            deadline = state.opened_at + self.round_deadline_s
            while True:
                if self.aborted is not None:
                    raise FederationAborted(self.aborted.reason)
                outstanding = self.server.outstanding()
                if not outstanding:
                    break
                silent = self.silent_ranks()
                if all(state.assignment[c] in silent for c in outstanding):
                    log.warning("round %s: closing early, ranks %s are silent", round_idx, sorted(silent))
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("round %s: deadline of %.0f s passed", round_idx, self.round_deadline_s)
                    break
                self.cond.wait(timeout=min(left, 0.5))
            return self.server.close_round()

    def publish(self, round_idx: int) -> RoundOutcome:
        """After the server's queries: finish the round and let the client ranks collect its outcome."""
        with self.cond:
            outcome = self.server.finish_round()
            record = outcome.record
            assert record is not None
            # What actually crossed the wire (client ranks only; rank 0's own clients use no RPC) since the
            # last round, and the seconds client ranks spent in transfers that carried data.
            self.server.add_round_metrics(
                {
                    "rpc_bytes_up": self.rpc_bytes["up"] - self._logged_bytes["up"],
                    "rpc_bytes_down": self.rpc_bytes["down"] - self._logged_bytes["down"],
                    "rpc_s": sum(m.get("rpc_s", 0.0) for m in record.client_metrics.values()),
                }
            )
            self._logged_bytes = dict(self.rpc_bytes)
            self.rounds[round_idx].outcome = outcome
            self.cond.notify_all()
            return outcome

    def fetch_outcome(
        self, rank: int, round_idx: int, state_needed: bool = True
    ) -> tuple[TrainableState | None, bool] | Aborted | None:
        """Whether the run ends with the finished round, and its global state if asked for or if it ends;
        ``None`` while the round is not finished."""
        with self.cond:
            if (stop := self._touch(rank)) is not None:
                return stop
            state = self.rounds.get(round_idx)
            if state is None or state.outcome is None:
                return None
            if not (state_needed or state.outcome.final):
                return None, False
            self.rpc_bytes["down"] += state_nbytes(state.outcome.global_state)
            return state.outcome.global_state, state.outcome.final


# Module-level functions: RPC ships a function by its qualified name and runs it on rank 0.
def _endpoint() -> ServerEndpoint:
    assert _ENDPOINT is not None, "this process hosts no server"
    return _ENDPOINT


def remote_fetch_round(rank: int, round_idx: int) -> tuple[RoundTicket, WireState] | Aborted | None:
    return _endpoint().fetch_round(rank, round_idx)


def remote_submit(rank: int, wire: WireUpdate) -> bool | Aborted:
    return _endpoint().submit(rank, wire)


def remote_fetch_outcome(
    rank: int, round_idx: int, state_needed: bool = True
) -> tuple[TrainableState | None, bool] | Aborted | None:
    return _endpoint().fetch_outcome(rank, round_idx, state_needed)


def remote_join(rank: int) -> tuple[int, TrainableState]:
    return _endpoint().join(rank)


def remote_heartbeat(rank: int) -> Aborted | None:
    return None if _ENDPOINT is None else _ENDPOINT.heartbeat(rank)


def remote_abort(rank: int, reason: str) -> None:
    if _ENDPOINT is not None:
        _ENDPOINT.abort(reason, rank=rank)


def remote_goodbye(rank: int, linger_s: float = 0.0) -> None:
    if _ENDPOINT is not None:
        _ENDPOINT.goodbye(rank, linger_s)


class ServerSide:
    """Rank 0's role: hosts the endpoint; its own clients call it directly (no RPC)."""

    def __init__(self, world_size: int, transport: TransportConfig, alarm: MainThreadAlarm) -> None:
        self.world_size, self.transport, self.alarm = world_size, transport, alarm
        self.endpoint: ServerEndpoint | None = None

    def host(self, server: FederatedServer, codec: Codec, reference: TrainableState, first_round: int) -> None:
        """Put the server behind an endpoint the other ranks can call (before ``init_rpc``, their barrier)."""
        global _ENDPOINT
        t = self.transport
        endpoint = ServerEndpoint(
            server, codec, reference, self.world_size, t.mode, t.round_deadline_s, t.liveness_timeout_s
        )
        endpoint.on_abort = self.alarm.ring
        endpoint.first_round = first_round
        self.endpoint = _ENDPOINT = endpoint

    def _endpoint(self) -> ServerEndpoint:
        assert self.endpoint is not None, "host() first"
        return self.endpoint

    def begin_round(self, round_idx: int) -> tuple[RoundTicket, WireState]:
        endpoint = self._endpoint()
        endpoint.open_round(round_idx)
        return _unless_aborted(endpoint.fetch_round(0, round_idx))

    def submit(self, wire: WireUpdate) -> bool:
        return _unless_aborted(self._endpoint().submit(0, wire))

    def close_round(self, round_idx: int) -> RoundRecord:
        return self._endpoint().close_when_ready(round_idx)

    def finish_round(self, round_idx: int, state_needed: bool = True) -> RoundOutcome:
        return self._endpoint().publish(round_idx)

    def abort(self, reason: str) -> None:
        if self.endpoint is not None:
            self.endpoint.abort(reason)

    def stop(self) -> None:
        """Before the agent goes: wait for every live rank's goodbye (after an abort, only a few heartbeats:
        every live rank hears of it by then; at the end of a run each still collects the last round's state)."""
        global _ENDPOINT
        if self.endpoint is not None:
            with self.endpoint.cond:  # the lingering goodbyes may return: every agent closes now
                self.endpoint.closing = True
                self.endpoint.cond.notify_all()
            aborted = self.endpoint.aborted is not None
            t = self.transport
            self.endpoint.wait_for_goodbyes(t.heartbeat_s * 5 + 5 if aborted else t.wait_timeout_s)
        _ENDPOINT = None


def _unless_aborted(answer: Any) -> Any:
    if isinstance(answer, Aborted):
        raise FederationAborted(answer.reason)
    assert answer is not None
    return answer
