"""Launchers decide where the server lives and which clients this process hosts.

``EmbeddedLauncher`` (one process: the server and every simulated client) and ``RPCLauncher``
(torch.distributed RPC: rank 0 hosts the server, every rank trains clients) carry the same round
protocol, :class:`RoundChannel`.
"""

from lightning_fedpeft.launchers.base import RoundChannel, RoundTicket
from lightning_fedpeft.launchers.embedded import EmbeddedLauncher
from lightning_fedpeft.launchers.rpc import RPCLauncher

__all__ = ["EmbeddedLauncher", "RPCLauncher", "RoundChannel", "RoundTicket"]
