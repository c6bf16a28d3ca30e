"""Launchers decide where the server lives and which clients this process hosts.

``EmbeddedLauncher`` (one process: the server and every simulated client) and ``RPCLauncher``
(torch.distributed RPC: rank 0 hosts the server, every rank trains clients) carry the same round
protocol, :class:`RoundChannel`; :func:`make_launcher` picks one from the environment.
"""

from lightning_fedpeft.launchers.base import MODES, FederationAborted, RoundChannel
from lightning_fedpeft.launchers.codec import COMPRESSIONS, Codec
from lightning_fedpeft.launchers.embedded import EmbeddedLauncher
from lightning_fedpeft.launchers.env import distributed_env
from lightning_fedpeft.launchers.rpc import RPCLauncher


def make_launcher(
    mode: str = "simulation",
    round_deadline_s: float = 600.0,
    liveness_timeout_s: float = 60.0,
    wait_timeout_s: float = 1800.0,
    compression: str = "none",
) -> RoundChannel:
    """torch.distributed RPC when ``WORLD_SIZE`` > 1 is set (torchrun), else this process hosts everything."""
    if mode not in MODES:
        raise ValueError(f"federation.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    if distributed_env() is not None:
        return RPCLauncher(mode, round_deadline_s, liveness_timeout_s, wait_timeout_s, compression=compression)
    if mode == "real":
        raise ValueError(
            "federation.mode='real' needs several processes (one per client): launch with torchrun, "
            "or use mode='simulation' in one process"
        )
    return EmbeddedLauncher(compression)


__all__ = [
    "COMPRESSIONS",
    "MODES",
    "Codec",
    "EmbeddedLauncher",
    "FederationAborted",
    "RPCLauncher",
    "RoundChannel",
    "make_launcher",
]
