"""Launchers decide where the server lives and which clients this process hosts.

``EmbeddedLauncher`` (one process: the server and every simulated client) and ``RPCLauncher``
(torch.distributed RPC: rank 0 hosts the server, every rank trains clients) carry the same round
protocol, :class:`RoundChannel`; :func:`make_launcher` picks one from the environment.
"""

from lightning_fedpeft.launchers.base import FederationAborted, RoundChannel
from lightning_fedpeft.launchers.codec import COMPRESSIONS, Codec
from lightning_fedpeft.launchers.embedded import EmbeddedLauncher
from lightning_fedpeft.launchers.env import distributed_env
from lightning_fedpeft.launchers.rpc import RPCLauncher
from lightning_fedpeft.launchers.settings import MODES, TransportConfig


def make_launcher(transport: TransportConfig | None = None) -> RoundChannel:
    """torch.distributed RPC when ``WORLD_SIZE`` > 1 is set (torchrun), else this process hosts everything."""
    transport = transport or TransportConfig()
    if distributed_env() is not None:
        return RPCLauncher(transport)
    if transport.mode == "real":
        raise ValueError(
            "federation.mode='real' needs several processes (one per client): launch with torchrun, "
            "or use mode='simulation' in one process"
        )
    return EmbeddedLauncher(transport.compression)


__all__ = [
    "COMPRESSIONS",
    "MODES",
    "Codec",
    "EmbeddedLauncher",
    "FederationAborted",
    "RPCLauncher",
    "RoundChannel",
    "TransportConfig",
    "make_launcher",
]
