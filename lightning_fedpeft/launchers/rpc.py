"""The multi-process runtime on torch.distributed RPC: rank 0 hosts the server, every rank trains clients.

Every process runs the same ``Trainer.fit`` with a ``RoundSync`` whose launcher is an
:class:`RPCLauncher`, which picks its role once, from its rank: rank 0 owns the
:class:`~lightning_fedpeft.server.FederatedServer` behind a
:class:`~lightning_fedpeft.launchers.rpc_server.ServerEndpoint` (``rpc_server.py``); the other ranks call it
over RPC (``rpc_client.py``). Only plain data crosses the wire:
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

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import replace

import torch.distributed.rpc as rpc

from lightning_fedpeft.launchers.alarm import MainThreadAlarm
from lightning_fedpeft.launchers.base import RoundChannel
from lightning_fedpeft.launchers.env import distributed_env
from lightning_fedpeft.launchers.rpc_client import ClientSide, worker_name
from lightning_fedpeft.launchers.rpc_server import ServerSide
from lightning_fedpeft.launchers.settings import TransportConfig
from lightning_fedpeft.protocol import ClientUpdate, RoundOutcome, RoundRecord, RoundTicket, TrainableState
from lightning_fedpeft.server import FederatedServer


class RPCLauncher(RoundChannel):
    """Rounds over torch.distributed RPC. Rank, world size, address and port come from the environment.

    Args:
        transport: the mode, the codec and the fault-handling timers, checked
            (:class:`~lightning_fedpeft.launchers.settings.TransportConfig`; its defaults if unset).
    """

    def __init__(self, transport: TransportConfig | None = None) -> None:
        transport = transport or TransportConfig()
        super().__init__(transport.compression)
        env = distributed_env()
        if env is None:
            raise ValueError(
                "RPCLauncher needs RANK and WORLD_SIZE > 1 in the environment (start with torchrun, or set "
                "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT on every process)"
            )
        self.rank, self.world_size = env
        self.transport = transport
        self.mode = transport.mode
        self._alarm = MainThreadAlarm()
        # The role, picked once: rank 0 hosts the server, every other rank calls it.
        self.side: ServerSide | ClientSide = (
            ServerSide(self.world_size, transport, self._alarm)
            if self.rank == 0
            else ClientSide(self.rank, transport.wait_timeout_s, transport.heartbeat_s, self._alarm)
        )
        self._started = False
        self._reference: TrainableState = {}
        self._received: TrainableState = {}

    @property
    def rpc_seconds(self) -> float:
        """Seconds this client rank was blocked in transfers since its last update (0 on rank 0)."""
        return self.side.rpc_seconds if isinstance(self.side, ClientSide) else 0.0

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
        self._reference = reference
        if isinstance(self.side, ServerSide):
            if server is None:
                raise ValueError("rank 0 hosts the server: RPCLauncher.start needs one")
            self.server = server
            self.side.host(server, self.codec, reference, first_round)
        if not self._started:
            # TCP ("uv") only: TensorPipe's shared-memory transport, its default between processes on one
            # machine, busy-polls in a reactor thread at about half a core for seconds after traffic, which on
            # 2 cores slowed every local step of 2 training ranks by 2x in some rounds (bench/ranks.py: 1.21x
            # instead of 1.93x speed-up; with uv, steady). No public option picks the transport.
            options = rpc.TensorPipeRpcBackendOptions(
                init_method="env://",
                rpc_timeout=self.transport.wait_timeout_s,
                num_worker_threads=max(16, 2 * self.world_size),
                _transports=["uv"],
            )
            # Only CPU tensors: the global state is small, and GPUs stay out of RPC.
            options.devices = []
            rpc.init_rpc(
                worker_name(self.rank), rank=self.rank, world_size=self.world_size, rpc_backend_options=options
            )
            self._started = True
        self._alarm.arm()
        if isinstance(self.side, ServerSide):
            return first_round
        # init_rpc is a barrier over every rank, and rank 0 set its endpoint before it: ask it where the run is.
        server_round, reference = self.side.join(first_round)
        if reference:
            self._reference = reference
        return server_round

    # -- the round -----------------------------------------------------------------------------------
    def begin_round(self, round_idx: int) -> RoundTicket:
        ticket, wire = self.side.begin_round(round_idx)
        self._received = self.codec.decode(wire, self._reference)
        return replace(ticket, global_state=self._received)

    def submit(self, update: ClientUpdate) -> bool:
        return self.side.submit(self.codec.encode_update(update, self._received))

    def close_round(self, round_idx: int) -> RoundRecord | None:
        return self.side.close_round(round_idx)

    def finish_round(self, round_idx: int, state_needed: bool = True) -> RoundOutcome:
        return self.side.finish_round(round_idx, state_needed)

    def abort(self, reason: str) -> None:
        if self._started:
            self.side.abort(reason)
        self.shutdown()

    def shutdown(self) -> None:
        self._alarm.disarm()
        if not self._started:
            return
        self.side.stop()
        # Not graceful: a graceful shutdown is a barrier over every rank, which a dead rank would hang.
        # Nothing is in flight by now: clients only ever call the server, and the server has waited for
        # every live client's goodbye, its last call.
        with _tensorpipe_quiet():
            rpc.shutdown(graceful=False)
        self._started = False


@contextlib.contextmanager
def _tensorpipe_quiet() -> Iterator[None]:
    """Drop what is written to the process's stderr (file descriptor 2) meanwhile.

    TensorPipe's agent threads log one ``[W ... tensorpipe_agent.cpp] ... pipe closed`` (``EOF``,
    ``ECONNRESET``) line per peer as the pipes of a run that ends on purpose close, which buries the run's
    one clear last message. They come from C++ (c10 logging, whose level is read once from
    ``TORCH_CPP_LOG_LEVEL`` when torch loads and has no setter), so the descriptor is pointed at
    ``/dev/null`` only while the agent shuts down; Python's own stderr is flushed first.
    """
    sys.stderr.flush()
    try:
        saved, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no descriptor 2 to point elsewhere: nothing to quiet
        yield
        return
    os.dup2(sink, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)
