"""The multi-process runtime on torch.distributed RPC: rank 0 hosts the server, every rank trains clients.

Every process runs the same ``Trainer.fit`` with a ``RoundSync`` whose launcher is an
:class:`RPCLauncher`. Rank 0 owns the :class:`~lightning_fedpeft.server.FederatedServer` behind a
:class:`ServerEndpoint`; the other ranks call it with ``rpc_sync``. Only plain data crosses the wire:
the round's assignment and instructions, the global trainable state, and client updates (trainable
tensors, encoded by the launcher's codec, plus what an algorithm adds).

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
client are rejected and logged. Silent ranks get no clients in later simulation rounds. A rank whose
``fit`` raises tells the server, which stops the federation: every other rank ends promptly with a
:class:`~lightning_fedpeft.launchers.base.FederationAborted` that names the failed rank and its error.

Security: RPC and c10d have **no authentication and no encryption**. Anyone who can reach the
rendezvous port or an RPC port can join or send data. Run only on trusted, private networks (see
``docs/distributed.md``). The endpoint only accepts ranks below the world size and checks that a rank
submits only for the clients it was assigned, which stops mistakes, not attackers.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed.rpc as rpc

from lightning_fedpeft.launchers.base import MODES, FederationAborted, RoundChannel
from lightning_fedpeft.launchers.codec import Codec, WireState
from lightning_fedpeft.protocol import ClientUpdate, RoundOutcome, RoundRecord, RoundTicket, TrainableState
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import require_host, state_nbytes

log = logging.getLogger(__name__)

_ENDPOINT: ServerEndpoint | None = None  # set on rank 0 only; the RPC functions below call into it


def _worker_name(rank: int) -> str:
    return f"fedpeft{rank}"


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

    def goodbye(self, rank: int) -> None:
        """``rank`` has stopped (at the end of fit, or after an abort) and makes no more calls."""
        with self.cond:
            self.told.add(rank)
            self.gone.add(rank)
            self.cond.notify_all()

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

    def submit(self, rank: int, update: ClientUpdate, wire: WireState) -> bool | Aborted:
        with self.cond:
            if (stop := self._touch(rank)) is not None:
                return stop
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
                self.rpc_bytes["up"] += wire.nbytes
            # A round long gone has nothing to decode against; the server rejects the update as late.
            update = replace(update, state=self.codec.decode(wire, state.sent) if state is not None else {})
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
            record.metrics["rpc_bytes_up"] = self.rpc_bytes["up"] - self._logged_bytes["up"]
            record.metrics["rpc_bytes_down"] = self.rpc_bytes["down"] - self._logged_bytes["down"]
            record.metrics["rpc_s"] = sum(m.get("rpc_s", 0.0) for m in record.client_metrics.values())
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


def _remote_fetch_round(rank: int, round_idx: int) -> tuple[RoundTicket, WireState] | Aborted | None:
    return _endpoint().fetch_round(rank, round_idx)


def _remote_submit(rank: int, update: ClientUpdate, wire: WireState) -> bool | Aborted:
    return _endpoint().submit(rank, update, wire)


def _remote_fetch_outcome(
    rank: int, round_idx: int, state_needed: bool = True
) -> tuple[TrainableState | None, bool] | Aborted | None:
    return _endpoint().fetch_outcome(rank, round_idx, state_needed)


def _remote_join(rank: int) -> tuple[int, TrainableState]:
    return _endpoint().join(rank)


def _remote_heartbeat(rank: int) -> Aborted | None:
    return None if _ENDPOINT is None else _ENDPOINT.heartbeat(rank)


def _remote_abort(rank: int, reason: str) -> None:
    if _ENDPOINT is not None:
        _ENDPOINT.abort(reason, rank=rank)


def _remote_goodbye(rank: int) -> None:
    if _ENDPOINT is not None:
        _ENDPOINT.goodbye(rank)


def distributed_env() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torchrun-style environment variables, or ``None`` if absent/single."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return (int(os.environ["RANK"]), world) if world > 1 else None


class _MainThreadAlarm:
    """Raises :class:`FederationAborted` in the main thread when another thread learns the run stopped.

    The main thread may be deep in local training, which can last minutes before its next call to the
    server; a simulated ``SIGUSR1`` (``_thread.interrupt_main``) runs the handler at its next Python
    bytecode. Installed only while ``fit`` runs, and only where there is a main thread and ``SIGUSR1``.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: Any = None
        self.armed = False

    def arm(self) -> None:
        if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGUSR1, self._raise)
        self.armed = True

    def _raise(self, signum: int, frame: Any) -> None:
        raise FederationAborted(self.reason or "the federation stopped")

    def ring(self, reason: str) -> None:
        if self.reason is None and self.armed:
            self.reason = reason
            _thread.interrupt_main(signal.SIGUSR1)

    def disarm(self) -> None:
        if self.armed:
            signal.signal(signal.SIGUSR1, self._previous)
            self.armed = False


class RPCLauncher(RoundChannel):
    """Rounds over torch.distributed RPC. Rank, world size, address and port come from the environment.

    Args:
        mode: ``simulation`` (virtual clients dealt to ranks) or ``real`` (client id = rank).
        round_deadline_s: the server closes a round this long after opening it, with what arrived.
        liveness_timeout_s: a rank silent this long is treated as gone.
        wait_timeout_s: how long a client rank waits for the server to open or close a round before it
            gives up (covers the server's validation between rounds).
        heartbeat_s: how often client ranks tell the server they are alive.
        compression: the codec of states on the wire (see :mod:`~lightning_fedpeft.launchers.codec`).
    """

    def __init__(
        self,
        mode: str = "simulation",
        round_deadline_s: float = 600.0,
        liveness_timeout_s: float = 60.0,
        wait_timeout_s: float = 1800.0,
        heartbeat_s: float = 2.0,
        compression: str = "none",
    ) -> None:
        super().__init__(compression)
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
        self._alarm = _MainThreadAlarm()
        self._reference: TrainableState = {}
        self._received: TrainableState = {}
        self.stopped_by: str | None = None  # why the federation stopped, once this process knows it
        self.round: int | None = None  # the round this process last joined
        self.rpc_seconds = 0.0
        self._upload: Any = None  # a client rank's update still on its way (a torch.futures.Future)

    def check_round_size(self, clients_per_round: int) -> None:
        # Lightning ends fit after an epoch without batches, so every rank must train every round.
        if self.mode == "simulation" and clients_per_round < self.world_size:
            raise ValueError(
                f"federation.clients_per_round={clients_per_round} is below the {self.world_size} ranks; every "
                f"rank trains at least one client per round, so use at least {self.world_size}"
            )
        if self.mode == "real" and clients_per_round != self.world_size:
            raise ValueError(
                f"federation.mode='real': every rank is one client and trains every round; set "
                f"federation.clients_per_round={self.world_size} (the number of ranks)"
            )

    # -- connection ----------------------------------------------------------------------------------
    def start(self, server: FederatedServer | None, reference: TrainableState, first_round: int = 0) -> int:
        global _ENDPOINT
        self._reference = reference
        if self.rank == 0:
            if server is None:
                raise ValueError("rank 0 hosts the server: RPCLauncher.start needs one")
            self.server = server
            self.endpoint = ServerEndpoint(
                server,
                self.codec,
                reference,
                self.world_size,
                self.mode,
                self.round_deadline_s,
                self.liveness_timeout_s,
            )
            self.endpoint.on_abort = self._alarm.ring
            self.endpoint.first_round = first_round
            _ENDPOINT = self.endpoint
        if not self._started:
            # TCP ("uv") only: TensorPipe's shared-memory transport, its default between processes on one
            # machine, busy-polls in a reactor thread at about half a core for seconds after traffic, which on
            # 2 cores slowed every local step of 2 training ranks by 2x in some rounds (bench/ranks.py: 1.21x
            # instead of 1.93x speed-up; with uv, steady). No public option picks the transport.
            options = rpc.TensorPipeRpcBackendOptions(
                init_method="env://",
                rpc_timeout=self.wait_timeout_s,
                num_worker_threads=max(16, 2 * self.world_size),
                _transports=["uv"],
            )
            # Only CPU tensors: the global state is small, and GPUs stay out of RPC.
            options.devices = []
            rpc.init_rpc(
                _worker_name(self.rank), rank=self.rank, world_size=self.world_size, rpc_backend_options=options
            )
            self._started = True
        self._alarm.arm()
        if self.rank == 0:
            return first_round
        # init_rpc is a barrier over every rank, and rank 0 set its endpoint before it: ask it where the run
        # is. A client rank restarted after a crash has no checkpoint of its own (only the server keeps one).
        server_round, reference = self._call(_remote_join)
        self.rpc_seconds = 0.0  # counted per round's transfers
        if reference:
            self._reference = reference
        if server_round != first_round:
            log.warning(
                "rank %d joins the run at round %d, where the server's checkpoint left it", self.rank, server_round
            )
        self._beat = threading.Thread(target=self._heartbeat_loop, name="fedpeft-heartbeat", daemon=True)
        self._beat.start()
        return server_round

    def _server_gone(self, err: BaseException) -> str:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"in round {self.round}" if self.round is not None else "before the first round"
        return (
            f"rank {self.rank} lost the server (rank 0) {where}: {detail}. The server's last checkpoint holds the "
            f"run: start every process again with --ckpt_path last"
        )

    def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                answer = rpc.rpc_sync(
                    _worker_name(0), _remote_heartbeat, args=(self.rank,), timeout=self.heartbeat_s * 5
                )
            except Exception as err:  # noqa: BLE001  (TensorPipe says "eof", "connection refused", ...)
                failures += 1
                if failures >= 2 and not self._stop.is_set():  # not one slow answer: the server is gone
                    self.stopped_by = self._server_gone(err)
                    self._alarm.ring(self.stopped_by)
                    return
                continue
            failures = 0
            if isinstance(answer, Aborted):
                self.stopped_by = answer.reason
                self._alarm.ring(answer.reason)
                return

    def _call(self, fn, *args):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        try:
            result = rpc.rpc_sync(_worker_name(0), fn, args=(self.rank, *args), timeout=self.wait_timeout_s)
        except RuntimeError as err:  # the transport's error when the server is gone, e.g. mid-upload
            self.stopped_by = self.stopped_by or self._server_gone(err)
            raise FederationAborted(self.stopped_by) from None
        if isinstance(result, Aborted):
            self.stopped_by = result.reason
            raise FederationAborted(result.reason)
        # Only calls that carried data count: not an empty poll (None), nor an outcome without its state
        # (None, final), whose time is the wait for the server to aggregate, which no transport saves.
        if result is not None and not (isinstance(result, tuple) and result[0] is None):
            self.rpc_seconds += time.perf_counter() - start
        return result

    def _poll(self, fn, round_idx: int, what: str, *args):  # noqa: ANN001, ANN002, ANN202
        start = time.monotonic()
        while True:
            result = self._call(fn, round_idx, *args)
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
        self.round = round_idx
        if self.rank == 0:
            assert self.endpoint is not None
            self.endpoint.open_round(round_idx)
            fetched = self.endpoint.fetch_round(0, round_idx)
            if isinstance(fetched, Aborted):
                raise FederationAborted(fetched.reason)
            assert fetched is not None
        else:
            self._await_upload()
            fetched = self._poll(_remote_fetch_round, round_idx, "open")
        ticket, wire = fetched
        self._received = self.codec.decode(wire, self._reference)
        return replace(ticket, global_state=self._received)

    def submit(self, update: ClientUpdate) -> bool:
        require_host(update.tensors, "tensor beside the state")  # TensorPipe here is set up for CPU tensors only
        wire = self.codec.encode(update.state, self._received)
        bare = replace(update, state={})  # the state travels encoded, beside it
        if self.rank == 0:
            assert self.endpoint is not None
            accepted = self.endpoint.submit(0, bare, wire)
            if isinstance(accepted, Aborted):
                raise FederationAborted(accepted.reason)
            return accepted
        # The upload goes while this rank trains its next client: the server checks and records an update
        # under its lock, which takes as long as the transfer for a large state (tens of MB), and a rank
        # that waited for that answer idled. One upload is in flight at a time, so a rank's updates arrive
        # in order and memory holds at most one encoded state besides the one being trained. The tensors
        # are copies (host_trainable_state), so training the next client cannot change them in flight.
        self._await_upload()
        bare.metrics["rpc_s"] = self.rpc_seconds  # seconds blocked in transfers since the previous update
        self.rpc_seconds = 0.0
        start = time.perf_counter()
        self._upload = rpc.rpc_async(
            _worker_name(0), _remote_submit, args=(self.rank, bare, wire), timeout=self.wait_timeout_s
        )
        self.rpc_seconds += time.perf_counter() - start  # serializing the update (the send itself is async)
        return True  # whether it was accepted is known later, on the server (the round's record says)

    def _await_upload(self) -> None:
        """Wait for the update in flight, counting the wait as transfer time; raise if the run stopped."""
        upload, self._upload = self._upload, None
        if upload is None:
            return
        start = time.perf_counter()
        try:
            result = upload.wait()
        except RuntimeError as err:  # the transport's error when the server is gone, e.g. mid-upload
            self.stopped_by = self.stopped_by or self._server_gone(err)
            raise FederationAborted(self.stopped_by) from None
        finally:
            self.rpc_seconds += time.perf_counter() - start
        if isinstance(result, Aborted):
            self.stopped_by = result.reason
            raise FederationAborted(result.reason)

    def close_round(self, round_idx: int) -> RoundRecord | None:
        if self.rank != 0:
            return None
        assert self.endpoint is not None
        return self.endpoint.close_when_ready(round_idx)

    def finish_round(self, round_idx: int, state_needed: bool = True) -> RoundOutcome:
        if self.rank == 0:
            assert self.endpoint is not None
            return self.endpoint.publish(round_idx)
        self._await_upload()  # the round's last update is on the server before its outcome is asked for
        state, final = self._poll(_remote_fetch_outcome, round_idx, "close", state_needed)
        return RoundOutcome(round_idx, state or {}, final)

    def abort(self, reason: str) -> None:
        self.stopped_by = self.stopped_by or reason
        if self._started and self.rank == 0 and self.endpoint is not None:
            self.endpoint.abort(reason)
        elif self._started:
            try:
                rpc.rpc_sync(_worker_name(0), _remote_abort, args=(self.rank, reason), timeout=5)
            except Exception:  # the server is gone too: nothing to tell
                pass
        self.shutdown()

    def shutdown(self) -> None:
        global _ENDPOINT
        self._stop.set()
        self._alarm.disarm()
        if not self._started:
            return
        if self.rank == 0 and self.endpoint is not None:
            # After an abort every live rank hears of it within a few heartbeats; at the end of a run it
            # still collects the last round's state (its last call before its goodbye).
            aborted = self.endpoint.aborted is not None
            self.endpoint.wait_for_goodbyes(self.heartbeat_s * 5 + 5 if aborted else self.wait_timeout_s)
        if self._upload is not None:  # nothing may be in flight when the agent stops (see below)
            try:
                self._upload.wait()
            except Exception:  # the server is gone: the update is lost with it
                pass
            self._upload = None
        if self._beat is not None:
            # A heartbeat still inside rpc_sync when the agent shuts down aborts the process ("terminate
            # called without an active exception"), so wait for it; once the server is gone it fails fast.
            self._beat.join(timeout=self.heartbeat_s * 5 + 1)
            self._beat = None
        if self.rank != 0:  # tell the server this rank makes no more calls
            try:
                rpc.rpc_sync(_worker_name(0), _remote_goodbye, args=(self.rank,), timeout=5)
            except Exception:  # the server is already gone
                pass
        # Not graceful: a graceful shutdown is a barrier over every rank, which a dead rank would hang.
        # Nothing is in flight by now: clients only ever call the server, and the server has waited for
        # every live client's goodbye, its last call.
        rpc.shutdown(graceful=False)
        self._started = False
        _ENDPOINT = None
