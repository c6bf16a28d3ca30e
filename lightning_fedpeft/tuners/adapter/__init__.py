"""Bottleneck adapters (Houlsby/Pfeiffer style) placed after each layer's feed-forward block.

peft 0.21 ships no bottleneck adapter, and the ``adapters`` library pins transformers ~4.57, which
cannot sit beside transformers 5, so this small tuner is written here. Layout follows peft's tuners:
``config`` (the dataclass), ``layer`` (the math), ``model`` (the injection into a backbone).
"""

from lightning_fedpeft.tuners.adapter.config import AdapterConfig
from lightning_fedpeft.tuners.adapter.layer import BottleneckAdapter
from lightning_fedpeft.tuners.adapter.model import AdapterInjection, find_transformer_layers, inject_adapters

__all__ = ["AdapterConfig", "AdapterInjection", "BottleneckAdapter", "find_transformer_layers", "inject_adapters"]
