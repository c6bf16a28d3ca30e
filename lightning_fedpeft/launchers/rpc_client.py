"""The client ranks' side of the RPC runtime: every call to the server on rank 0, and the heartbeat.

:class:`ClientSide` is the half of :class:`~lightning_fedpeft.launchers.rpc.RPCLauncher` that ranks
above 0 play. It polls the endpoint for a round's ticket and outcome, uploads updates in the background
(one in flight at a time) while the next client trains, tells the server it is alive every
``heartbeat_s``, and turns every way the server can stop answering into one
:class:`~lightning_fedpeft.launchers.base.FederationAborted` that says what happened and what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed.rpc as rpc

from lightning_fedpeft.launchers import rpc_server
from lightning_fedpeft.launchers.alarm import MainThreadAlarm
from lightning_fedpeft.launchers.base import FederationAborted
from lightning_fedpeft.launchers.codec import WireState, WireUpdate
from lightning_fedpeft.protocol import RoundOutcome, RoundTicket, TrainableState

log = logging.getLogger(__name__)

SERVER = "fedpeft0"  # rank 0's RPC worker name (see worker_name)


def worker_name(rank: int) -> str:
    """The RPC worker name of ``rank``."""
    return f"fedpeft{rank}"


class ClientSide:
    """A client rank's role: calls the server's endpoint on rank 0 over RPC."""

    def __init__(self, rank: int, wait_timeout_s: float, heartbeat_s: float, alarm: MainThreadAlarm) -> None:
        self.rank = rank
        self.wait_timeout_s, self.heartbeat_s = wait_timeout_s, heartbeat_s
        self.alarm = alarm
        self.stopped_by: str | None = None  # why the federation stopped, once this process knows it
        self.round: int | None = None  # the round this process last joined
        self.rpc_seconds = 0.0  # seconds blocked in transfers that carried data, since the last update
        self._upload: Any = None  # an update still on its way (a torch.futures.Future)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def join(self, first_round: int) -> tuple[int, TrainableState]:
        """Ask the server where the run is (its first round and the codec's reference); start the heartbeat.

        A client rank restarted after a crash has no checkpoint of its own (only the server keeps one).
        """
        server_round, reference = self._call(rpc_server.remote_join)
        self.rpc_seconds = 0.0  # counted per round's transfers
        if server_round != first_round:
            log.warning(
                "rank %d joins the run at round %d, where the server's checkpoint left it", self.rank, server_round
            )
        self._beat = threading.Thread(target=self._heartbeat_loop, name="fedpeft-heartbeat", daemon=True)
        self._beat.start()
        return server_round, reference

    # -- the round -----------------------------------------------------------------------------------
    def begin_round(self, round_idx: int) -> tuple[RoundTicket, WireState]:
        self.round = round_idx
        self._await_upload()
        return self._poll(rpc_server.remote_fetch_round, round_idx, "open")

    def submit(self, wire: WireUpdate) -> bool:
        # The upload goes while this rank trains its next client: the server checks and records an update
        # under its lock, which takes as long as the transfer for a large state (tens of MB), and a rank
        # that waited for that answer idled. One upload is in flight at a time, so a rank's updates arrive
        # in order and memory holds at most one encoded state besides the one being trained. The tensors
        # are copies (host_trainable_state), so training the next client cannot change them in flight.
        self._await_upload()
        wire.update.metrics["rpc_s"] = self.rpc_seconds  # seconds blocked in transfers since the previous update
        self.rpc_seconds = 0.0
        start = time.perf_counter()
        self._upload = rpc.rpc_async(
            SERVER, rpc_server.remote_submit, args=(self.rank, wire), timeout=self.wait_timeout_s
        )
        self.rpc_seconds += time.perf_counter() - start  # serializing the update (the send itself is async)
        return True  # whether it was accepted is known later, on the server (the round's record says)

    def close_round(self, round_idx: int) -> None:
        return None  # the server closes rounds

    def finish_round(self, round_idx: int, state_needed: bool = True) -> RoundOutcome:
        self._await_upload()  # the round's last update is on the server before its outcome is asked for
        state, final = self._poll(rpc_server.remote_fetch_outcome, round_idx, "close", state_needed)
        return RoundOutcome(round_idx, state or {}, final)

    # -- the end ---------------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """Tell the server this rank failed (it stops the others); nothing to tell if it is gone too."""
        self.stopped_by = self.stopped_by or reason
        try:
            rpc.rpc_sync(SERVER, rpc_server.remote_abort, args=(self.rank, reason), timeout=5)
        except Exception:  # noqa: BLE001  (the server is gone too)
            pass

    def stop(self) -> None:
        """Nothing in flight, no heartbeat, and a goodbye to the server: this rank makes no more calls."""
        self._stop.set()
        if self._upload is not None:  # nothing may be in flight when the agent stops
            try:
                self._upload.wait()
            except Exception:  # noqa: BLE001  (the server is gone: the update is lost with it)
                pass
            self._upload = None
        if self._beat is not None:
            # A heartbeat still inside rpc_sync when the agent shuts down aborts the process ("terminate
            # called without an active exception"), so wait for it; once the server is gone it fails fast.
            self._beat.join(timeout=self.heartbeat_s * 5 + 1)
            self._beat = None
        # The answer comes when the server closes its agent too (after its evaluation and test), so that
        # neither side sees the other's pipes close while it runs (TensorPipe warns of each).
        linger = 0.0 if self.stopped_by is not None else self.wait_timeout_s
        try:
            rpc.rpc_sync(SERVER, rpc_server.remote_goodbye, args=(self.rank, linger), timeout=linger + 5)
        except Exception:  # noqa: BLE001  (the server is already gone)
            pass

    # -- calls -----------------------------------------------------------------------------------------
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
                    SERVER, rpc_server.remote_heartbeat, args=(self.rank,), timeout=self.heartbeat_s * 5
                )
            except Exception as err:  # noqa: BLE001  (TensorPipe says "eof", "connection refused", ...)
                failures += 1
                if failures >= 2 and not self._stop.is_set():  # not one slow answer: the server is gone
                    self.stopped_by = self._server_gone(err)
                    self.alarm.ring(self.stopped_by)
                    return
                continue
            failures = 0
            if isinstance(answer, rpc_server.Aborted):
                self.stopped_by = answer.reason
                self.alarm.ring(answer.reason)
                return

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            result = rpc.rpc_sync(SERVER, fn, args=(self.rank, *args), timeout=self.wait_timeout_s)
        except RuntimeError as err:  # the transport's error when the server is gone, e.g. mid-upload
            self.stopped_by = self.stopped_by or self._server_gone(err)
            raise FederationAborted(self.stopped_by) from None
        if isinstance(result, rpc_server.Aborted):
            self.stopped_by = result.reason
            raise FederationAborted(result.reason)
        # Only calls that carried data count: not an empty poll (None), nor an outcome without its state
        # (None, final), whose time is the wait for the server to aggregate, which no transport saves.
        if result is not None and not (isinstance(result, tuple) and result[0] is None):
            self.rpc_seconds += time.perf_counter() - start
        return result

    def _poll(self, fn: Callable[..., Any], round_idx: int, what: str, *args: Any) -> Any:
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
        if isinstance(result, rpc_server.Aborted):
            self.stopped_by = result.reason
            raise FederationAborted(result.reason)
