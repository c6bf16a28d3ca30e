"""The embedded (one-process) launcher: rank 0 is the server and hosts every simulated client."""

from __future__ import annotations

from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.strategy import Strategy


class EmbeddedLauncher:
    """Server and all clients in this process; the server is called directly, nothing is serialized."""

    def connect(self, strategy: Strategy, num_clients: int) -> FederatedServer:
        """Return the server handle that ``RoundSync`` talks to."""
        return FederatedServer(strategy, num_clients)

    def hosts(self, client_id: int) -> bool:
        """Whether this process trains ``client_id`` (always, here)."""
        return True
