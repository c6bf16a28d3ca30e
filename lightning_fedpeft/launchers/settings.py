"""TransportConfig: every setting of the transport, its default and its check, in one place.

``RoundSync`` exposes them as ``federation.*`` (its defaults are read from here), ``make_launcher`` and
``RPCLauncher`` take the checked object.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_fedpeft.launchers.codec import Codec

MODES: tuple[str, ...] = ("simulation", "real")


@dataclass(frozen=True)
class TransportConfig:
    """How a round travels between clients and the server, checked when built (``ValueError`` naming it).

    Args:
        mode: with several processes: ``simulation`` (the round's virtual clients are dealt to the ranks)
            or ``real`` (each rank is one client with its own data). Ignored in one process.
        compression: the codec of states on the wire: ``none`` or ``int8`` (see
            :mod:`~lightning_fedpeft.launchers.codec`).
        round_deadline_s: the server closes a round this long after opening it, with what arrived.
        liveness_timeout_s: a rank silent this long is treated as gone.
        wait_timeout_s: how long a client rank waits for the server to open or close a round before it
            gives up (it covers the server's validation between rounds).
        heartbeat_s: how often client ranks tell the server they are alive; below ``liveness_timeout_s``.
    """

    mode: str = "simulation"
    compression: str = "none"
    round_deadline_s: float = 600.0
    liveness_timeout_s: float = 60.0
    wait_timeout_s: float = 1800.0
    heartbeat_s: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"federation.mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        Codec(self.compression)  # the codec checks its own setting (ValueError naming federation.compression)
        for name in ("round_deadline_s", "liveness_timeout_s", "wait_timeout_s", "heartbeat_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"federation.{name}={value!r} must be a positive number of seconds")
        if self.heartbeat_s >= self.liveness_timeout_s:
            raise ValueError(
                f"federation.heartbeat_s={self.heartbeat_s} must be below federation.liveness_timeout_s="
                f"{self.liveness_timeout_s}: a rank that beats less often than that would be taken for gone"
            )


DEFAULTS = TransportConfig()
