"""Heterogeneous LoRA: a fixed LoRA rank per device profile of a fleet, aggregated per coordinate (exact)
or with HetLoRA's zero-padding (the baseline). Server half in :mod:`.strategy`, client half in :mod:`.client`."""

from lightning_fedpeft.hetlora.client import HeterogeneousLoRA, RankCut, lora_layers
from lightning_fedpeft.hetlora.strategy import HeteroLoRAStrategy, lora_modules, rank_masks

__all__ = ["HeteroLoRAStrategy", "HeterogeneousLoRA", "RankCut", "lora_layers", "lora_modules", "rank_masks"]
