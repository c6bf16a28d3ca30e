"""FedARA: federated rank allocation over truncated-SVD adapters, and pruning of modules left without rank.

The SVD adaptation itself is peft's AdaLoRA layer (``model.method='svd'``): ``ΔW = P Λ Q`` per adapted
linear layer, ``r_init`` triplets (P column, Λ entry, Q row) each, with the orthogonality penalty in the
loss. What is federated lives here; the paper gives no protocol, so this one is ours (docs/fedara.md lists
every choice). The server half (plain torch) is in :mod:`~lightning_fedpeft.fedara.strategy`, the client
half (Lightning callbacks) in :mod:`~lightning_fedpeft.fedara.client`.
"""

from lightning_fedpeft.fedara.client import ModulePruning, RankAllocation, triplet_importance
from lightning_fedpeft.fedara.strategy import IMPORTANCE, BudgetSchedule, RankAllocationStrategy

__all__ = [
    "IMPORTANCE",
    "BudgetSchedule",
    "ModulePruning",
    "RankAllocation",
    "RankAllocationStrategy",
    "triplet_importance",
]
