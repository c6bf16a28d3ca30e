"""The multi-process runtime on torch.distributed RPC: rank 0 hosts the server, every rank trains clients.

Every process runs the same ``Trainer.fit`` with a ``RoundSync`` whose launcher is an
:class:`RPCLauncher`. Rank 0 owns the :class:`~lightning_fedpeft.server.FederatedServer` behind a
:class:`ServerEndpoint`; the other ranks call it with ``rpc_sync``. Only plain data crosses the wire:
the round's assignment, the global trainable state, and client updates (trainable tensors plus what
an algorithm adds).

Modes:

* ``simulation``: N virtual clients; each round the participants are dealt round-robin to the live
  ranks, so R processes train a round about R times faster.
* ``real``: each rank is one client (client id = rank) holding its own data, as on edge boards or one
  client per GPU node.

Faults: a round has a deadline (``round_deadline_s``, from its opening). The server closes it with the
updates that arrived when every participant has answered, when the deadline passes, or as soon as the
only participants still outstanding sit on ranks that went silent (no heartbeat for
``liveness_timeout_s``); missing clients are recorded. Updates for a closed round are dropped; updates
that are not finite, have the wrong names or shapes, or come from a rank that was not assigned that
client are rejected and logged. Silent ranks get no clients in later simulation rounds.

Security: RPC and c10d have **no authentication and no encryption**. Anyone who can reach the
rendezvous port or an RPC port can join or send data. Run only on trusted, private networks (see
``docs/distributed.md``). The endpoint only accepts ranks below the world size and checks that a rank
submits only for the clients it was assigned, which stops mistakes, not attackers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch.distributed.rpc as rpc

from lightning_fedpeft.launchers.base import RoundChannel, RoundTicket
from lightning_fedpeft.server import FederatedServer, RoundRecord
from lightning_fedpeft.state import TrainableState, state_nbytes
from lightning_fedpeft.strategy import ClientUpdate, Strategy

log = logging.getLogger(__name__)

MODES = ("simulation", "real")
_ENDPOINT: ServerEndpoint | None = None  # set on rank 0 only; the RPC functions below call into it


def _worker_name(rank: int) -> str:
    return f"fedpeft{rank}"


@dataclass
class _RoundState:
    round: int
    assignment: dict[int, int]  # client id -> rank
    opened_at: float
    instructions: dict[int, dict]
    closed_state: TrainableState | None = None
    final: bool = False  # the closed round's record is final: the run ends with it
    fetched: set[int] = field(default_factory=set)  # ranks that collected the closed round's global state


class ServerEndpoint:
    """Rank 0's thread-safe front of the server: RPC threads and rank 0's own training thread share it."""

    def __init__(
        self,
        server: FederatedServer,
        world_size: int,
        mode: str,
        round_deadline_s: float,
        liveness_timeout_s: float,
    ) -> None:
        self.server = server
        self.world_size = world_size
        self.mode = mode
        self.round_deadline_s = round_deadline_s
        self.liveness_timeout_s = liveness_timeout_s
        self.cond = threading.Condition()
        self.rounds: dict[int, _RoundState] = {}
        self.last_seen: dict[int, float] = {r: time.monotonic() for r in range(world_size)}
        self.rpc_bytes = {"up": 0, "down": 0}
        self._logged_bytes = {"up": 0, "down": 0}

    # -- liveness ------------------------------------------------------------------------------------
    def _touch(self, rank: int) -> None:
        self.last_seen[rank] = time.monotonic()

    def silent_ranks(self) -> set[int]:
        now = time.monotonic()
        return {r for r, t in self.last_seen.items() if r != 0 and now - t > self.liveness_timeout_s}

    def heartbeat(self, rank: int) -> None:
        with self.cond:
            if 0 <= rank < self.world_size:
                self._touch(rank)
                self.cond.notify_all()

    # -- the round -----------------------------------------------------------------------------------
    def open_round(self, round_idx: int) -> None:
        with self.cond:
            plan = self.server.open_round(round_idx)
            if self.mode == "real":
                assignment = {cid: cid for cid in plan.client_ids}
            else:
                ranks = [r for r in range(self.world_size) if r not in self.silent_ranks()]
                assignment = {cid: ranks[i % len(ranks)] for i, cid in enumerate(plan.client_ids)}
            self.rounds[round_idx] = _RoundState(round_idx, assignment, time.monotonic(), dict(plan.instructions))
            self.rounds.pop(round_idx - 2, None)  # keep memory bounded; late callers of old rounds get None
            self.cond.notify_all()

    def fetch_round(self, rank: int, round_idx: int) -> RoundTicket | None:
        """The ticket of ``rank`` for ``round_idx``; ``None`` while the server has not opened it yet."""
        with self.cond:
            self._touch(rank)
            state = self.rounds.get(round_idx)
            if state is None or state.closed_state is not None:
                return None
            mine = [cid for cid, r in state.assignment.items() if r == rank]
            if rank != 0:
                self.rpc_bytes["down"] += state_nbytes(self.server.global_state)
            return RoundTicket(
                round_idx,
                mine,
                self.server.global_state,
                {cid: state.instructions.get(cid, {}) for cid in mine},
            )

    def submit(self, rank: int, update: ClientUpdate) -> bool:
        with self.cond:
            self._touch(rank)
            state = self.rounds.get(update.round)
            expected = state.assignment.get(update.client_id) if state is not None else None
            if not 0 <= rank < self.world_size or (expected is not None and expected != rank):
                reason = f"rank {rank} is not the rank assigned client {update.client_id} (expected {expected})"
                log.warning("round %s: rejected update: %s", update.round, reason)
                if self.server.record is not None and update.round == self.server.record.round and expected is not None:
                    self.server.record.rejected.setdefault(update.client_id, reason)
                self.cond.notify_all()
                return False
            if rank != 0:
                self.rpc_bytes["up"] += state_nbytes(update.state)
            accepted = self.server.submit(update)
            self.cond.notify_all()
            return accepted

    def close_when_ready(self, round_idx: int) -> tuple[TrainableState, RoundRecord]:
        """Block until every participant answered, the deadline passed, or only silent ranks are left."""
        with self.cond:
            state = self.rounds[round_idx]
            deadline = state.opened_at + self.round_deadline_s
            while True:
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
            new_state = self.server.close_round()
            record = self.server.record
            assert record is not None
            # Set before the state is published, so every rank learns it with the state it fetches.
            state.final = record.final
            state.closed_state = new_state
            self.cond.notify_all()
            # What actually crossed the wire (client ranks only; rank 0's own clients use no RPC) since the
            # last close, and the seconds client ranks spent in transfers that carried data.
            record.extras["rpc_bytes_up"] = self.rpc_bytes["up"] - self._logged_bytes["up"]
            record.extras["rpc_bytes_down"] = self.rpc_bytes["down"] - self._logged_bytes["down"]
            record.extras["rpc_s"] = sum(m.get("rpc_s", 0.0) for m in record.client_metrics.values())
            self._logged_bytes = dict(self.rpc_bytes)
            return new_state, record

    def fetch_global(self, rank: int, round_idx: int) -> tuple[TrainableState, bool] | None:
        """The closed round's global state and whether the run ends with it; ``None`` while still open."""
        with self.cond:
            self._touch(rank)
            state = self.rounds.get(round_idx)
            if state is None or state.closed_state is None:
                return None
            self.rpc_bytes["down"] += state_nbytes(state.closed_state)
            state.fetched.add(rank)
            self.cond.notify_all()
            return state.closed_state, state.final

    def wait_for_clients_to_finish(self, timeout_s: float) -> None:
        """Before the server goes away: let every live rank collect the last round's global state."""
        with self.cond:
            closed = [r for r in self.rounds.values() if r.closed_state is not None]
            if not closed:
                return
            last = max(closed, key=lambda r: r.round)
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                waiting = set(range(1, self.world_size)) - last.fetched - self.silent_ranks()
                if not waiting:
                    return
                self.cond.wait(timeout=0.5)
            log.warning("ranks %s did not collect the final global state", sorted(waiting))


# Module-level functions: RPC ships a function by its qualified name and runs it on rank 0.
def _remote_fetch_round(rank: int, round_idx: int) -> RoundTicket | None:
    assert _ENDPOINT is not None, "this process hosts no server"
    return _ENDPOINT.fetch_round(rank, round_idx)


def _remote_submit(rank: int, update: ClientUpdate) -> bool:
    assert _ENDPOINT is not None, "this process hosts no server"
    return _ENDPOINT.submit(rank, update)


def _remote_fetch_global(rank: int, round_idx: int) -> tuple[TrainableState, bool] | None:
    assert _ENDPOINT is not None, "this process hosts no server"
    return _ENDPOINT.fetch_global(rank, round_idx)


def _remote_heartbeat(rank: int) -> None:
    if _ENDPOINT is not None:
        _ENDPOINT.heartbeat(rank)


def distributed_env() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torchrun-style environment variables, or ``None`` if absent/single."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return (int(os.environ["RANK"]), world) if world > 1 else None


class RPCLauncher(RoundChannel):
    """Rounds over torch.distributed RPC. Rank, world size, address and port come from the environment.

    Args:
        mode: ``simulation`` (virtual clients dealt to ranks) or ``real`` (client id = rank).
        round_deadline_s: the server closes a round this long after opening it, with what arrived.
        liveness_timeout_s: a rank silent this long is treated as gone.
        wait_timeout_s: how long a client rank waits for the server to open or close a round before it
            gives up (covers the server's validation between rounds).
        heartbeat_s: how often client ranks tell the server they are alive.
    """

    def __init__(
        self,
        mode: str = "simulation",
        round_deadline_s: float = 600.0,
        liveness_timeout_s: float = 60.0,
        wait_timeout_s: float = 1800.0,
        heartbeat_s: float = 2.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"federation.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        for name, value in (
            ("round_deadline_s", round_deadline_s),
            ("liveness_timeout_s", liveness_timeout_s),
            ("wait_timeout_s", wait_timeout_s),
            ("heartbeat_s", heartbeat_s),
        ):
            if not value > 0:
                raise ValueError(f"federation.{name}={value} must be positive")
        env = distributed_env()
        if env is None:
            raise ValueError(
                "RPCLauncher needs RANK and WORLD_SIZE > 1 in the environment (start with torchrun, or set "
                "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT on every process)"
            )
        self.rank, self.world_size = env
        self.mode = mode
        self.round_deadline_s = round_deadline_s
        self.liveness_timeout_s = liveness_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.heartbeat_s = heartbeat_s
        self.endpoint: ServerEndpoint | None = None
        self._started = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.rpc_seconds = 0.0

    # -- connection ----------------------------------------------------------------------------------
    def start(self, strategy: Strategy, num_clients: int, initial_state: TrainableState) -> None:
        global _ENDPOINT
        if self.rank == 0:
            server = FederatedServer(strategy, num_clients, self.stop_rule)
            server.initialize(initial_state)
            self.endpoint = ServerEndpoint(
                server, self.world_size, self.mode, self.round_deadline_s, self.liveness_timeout_s
            )
            _ENDPOINT = self.endpoint
        if not self._started:
            options = rpc.TensorPipeRpcBackendOptions(
                init_method="env://", rpc_timeout=self.wait_timeout_s, num_worker_threads=max(16, 2 * self.world_size)
            )
            # Only the CPU TensorPipe transport: the global state is small, and GPUs stay out of RPC.
            options.devices = []
            rpc.init_rpc(
                _worker_name(self.rank), rank=self.rank, world_size=self.world_size, rpc_backend_options=options
            )
            self._started = True
        if self.rank != 0:
            self._beat = threading.Thread(target=self._heartbeat_loop, name="fedpeft-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                rpc.rpc_sync(_worker_name(0), _remote_heartbeat, args=(self.rank,), timeout=self.heartbeat_s * 5)
            except Exception:  # the server may be busy or gone; the waits below report it
                pass

    def _call(self, fn, *args):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        result = rpc.rpc_sync(_worker_name(0), fn, args=(self.rank, *args), timeout=self.wait_timeout_s)
        if result is not None:  # a call that carried data (not an empty poll)
            self.rpc_seconds += time.perf_counter() - start
        return result

    def _poll(self, fn, round_idx: int, what: str):  # noqa: ANN001, ANN202
        start = time.monotonic()
        while True:
            result = self._call(fn, round_idx)
            if result is not None:
                return result
            if time.monotonic() - start > self.wait_timeout_s:
                raise TimeoutError(
                    f"rank {self.rank} waited {self.wait_timeout_s:.0f} s for the server to {what} round "
                    f"{round_idx}; is rank 0 alive? (raise federation.wait_timeout_s for long evaluations)"
                )
            time.sleep(0.02)

    # -- the round -----------------------------------------------------------------------------------
    def begin_round(self, round_idx: int) -> RoundTicket:
        if self.rank == 0:
            assert self.endpoint is not None
            self.endpoint.open_round(round_idx)
            ticket = self.endpoint.fetch_round(0, round_idx)
            assert ticket is not None
            return ticket
        return self._poll(_remote_fetch_round, round_idx, "open")

    def submit(self, update: ClientUpdate) -> bool:
        if self.rank == 0:
            assert self.endpoint is not None
            return self.endpoint.submit(0, update)
        update.metrics["rpc_s"] = self.rpc_seconds  # transfer seconds since the previous update
        self.rpc_seconds = 0.0
        return bool(self._call(_remote_submit, update))

    def end_round(self, round_idx: int) -> tuple[TrainableState, RoundRecord | None]:
        if self.rank == 0:
            assert self.endpoint is not None
            new_state, record = self.endpoint.close_when_ready(round_idx)
            if record.final:
                self.final_round = round_idx
            return new_state, record
        new_state, final = self._poll(_remote_fetch_global, round_idx, "close")
        if final:
            self.final_round = round_idx
        return new_state, None

    def shutdown(self) -> None:
        global _ENDPOINT
        self._stop.set()
        if not self._started:
            return
        if self.rank == 0 and self.endpoint is not None:
            self.endpoint.wait_for_clients_to_finish(self.wait_timeout_s)
        if self._beat is not None:
            # A heartbeat still inside rpc_sync when the agent shuts down aborts the process ("terminate
            # called without an active exception"), so wait for it; once the server is gone it fails fast.
            self._beat.join(timeout=self.heartbeat_s * 5 + 1)
            self._beat = None
        # Not graceful: a graceful shutdown is a barrier over every rank, which a dead rank would hang.
        # Nothing is in flight by now: clients only ever call the server, and the server has waited for
        # every live client to collect the final state.
        rpc.shutdown(graceful=False)
        self._started = False
        _ENDPOINT = None
