"""The math of a bottleneck adapter."""

from __future__ import annotations

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """``h + up(relu(down(h)))``: down-projection, ReLU, up-projection, residual; no LayerNorm inside.

    The up-projection starts at zero, so a freshly inserted adapter is the identity and leaves the
    pre-trained model's output unchanged.
    """

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, width)
        self.up = nn.Linear(width, hidden_size)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def width(self) -> int:
        return self.down.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(torch.relu(self.down(hidden)))
