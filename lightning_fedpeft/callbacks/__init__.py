"""Lightning callbacks that make a Trainer federated: RoundSync and every algorithm that runs on it."""

from lightning_fedpeft.callbacks.progress import FederatedProgressBar
from lightning_fedpeft.callbacks.round_sync import RoundSync
from lightning_fedpeft.depth_ranks import DepthRankUpgrade
from lightning_fedpeft.fedadapter import ProgressiveUpgrade
from lightning_fedpeft.fedara import ModulePruning, RankAllocation
from lightning_fedpeft.fedprox import FedProx
from lightning_fedpeft.hetlora import HeterogeneousLoRA
from lightning_fedpeft.resources import ClientResources

__all__ = [
    "ClientResources",
    "DepthRankUpgrade",
    "FedProx",
    "FederatedProgressBar",
    "HeterogeneousLoRA",
    "ModulePruning",
    "ProgressiveUpgrade",
    "RankAllocation",
    "RoundSync",
]
