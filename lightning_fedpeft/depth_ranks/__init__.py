"""FedAdapter x FedARA in one algorithm: progressive depth (trial groups, as FedAdapter) over SVD adapters whose
ranks the server allocates (as FedARA). Server half in :mod:`.strategy`, client half in :mod:`.client`."""

from lightning_fedpeft.depth_ranks.client import DepthRankUpgrade
from lightning_fedpeft.depth_ranks.strategy import DepthRankStrategy, StateCost

__all__ = ["DepthRankStrategy", "DepthRankUpgrade", "StateCost"]
