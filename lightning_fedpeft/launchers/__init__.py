"""Launchers decide where the server lives and which simulated clients this process hosts.

``EmbeddedLauncher`` (the default) keeps the server and every client in the current process.
"""

from lightning_fedpeft.launchers.embedded import EmbeddedLauncher

__all__ = ["EmbeddedLauncher"]
