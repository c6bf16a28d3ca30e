"""MainThreadAlarm: how a thread that learns the federation stopped interrupts the training thread."""

from __future__ import annotations

import _thread
import signal
import threading
from typing import Any

from lightning_fedpeft.launchers.base import FederationAborted


class MainThreadAlarm:
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
        """Install the handler (from the main thread; elsewhere, or without ``SIGUSR1``, nothing happens)."""
        if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGUSR1, self._raise)
        self.armed = True

    def _raise(self, signum: int, frame: Any) -> None:
        raise FederationAborted(self.reason or "the federation stopped")

    def ring(self, reason: str) -> None:
        """Interrupt the main thread with ``reason`` (once; later rings are ignored)."""
        if self.reason is None and self.armed:
            self.reason = reason
            _thread.interrupt_main(signal.SIGUSR1)

    def disarm(self) -> None:
        """Put the previous handler back."""
        if self.armed:
            signal.signal(signal.SIGUSR1, self._previous)
            self.armed = False
