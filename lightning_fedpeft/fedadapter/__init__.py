"""FedAdapter: progressive upgrade of adapter depth and width, decided by trial groups.

The server half (plain torch) is in :mod:`~lightning_fedpeft.fedadapter.strategy`, the client half
(the Lightning callback) in :mod:`~lightning_fedpeft.fedadapter.client`; docs/fedadapter.md has the design,
the cost model and the TX2 calibration.
"""

from lightning_fedpeft.fedadapter.client import ProgressiveUpgrade
from lightning_fedpeft.fedadapter.strategy import (
    CANDIDATES,
    Decision,
    EvaluateState,
    GrowState,
    RoundCost,
    Trial,
    TrialGroupStrategy,
)

__all__ = [
    "CANDIDATES",
    "Decision",
    "EvaluateState",
    "GrowState",
    "ProgressiveUpgrade",
    "RoundCost",
    "Trial",
    "TrialGroupStrategy",
]
