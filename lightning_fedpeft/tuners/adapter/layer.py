"""The math of a bottleneck adapter, and its function-preserving growth."""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02  # std of a fresh down-projection; the up-projection starts at zero


class BottleneckAdapter(nn.Module):
    """``h + up(relu(down(h)))``: down-projection, ReLU, up-projection, residual; no LayerNorm inside.

    The up-projection starts at zero, so a freshly inserted adapter is the identity and leaves the
    pre-trained model's output unchanged.
    """

    def __init__(self, hidden_size: int, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"adapter width={width} must be a positive integer")
        self.down = nn.Linear(hidden_size, width)
        self.up = nn.Linear(width, hidden_size)
        with torch.no_grad():
            self.down.weight.normal_(0.0, INIT_STD, generator=generator)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def width(self) -> int:
        return self.down.out_features

    @property
    def hidden_size(self) -> int:
        return self.down.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The adapter keeps float32 weights over a half-precision base: it computes in its own dtype (a no-op
        # for a float32 base) and hands the residual back in the base's.
        x = hidden.to(self.down.weight.dtype)
        return hidden + self.up(torch.relu(self.down(x))).to(hidden.dtype)

    def resized(self, width: int, generator: torch.Generator | None = None) -> BottleneckAdapter:
        """A copy of this adapter with ``width`` units.

        Growing keeps every trained unit and adds new ones whose up-projection columns are zero, so the
        function is unchanged (the new units' down-projection starts random, so they get gradients).
        Shrinking keeps the first ``width`` units; it is only exact when the dropped units' up columns are
        zero, and is used to go back to a narrower configuration before loading its state.
        """
        new = BottleneckAdapter(self.hidden_size, width, generator=generator).to(
            device=self.down.weight.device, dtype=self.down.weight.dtype
        )
        keep = min(width, self.width)
        with torch.no_grad():
            new.down.weight[:keep].copy_(self.down.weight[:keep])
            new.down.bias[:keep].copy_(self.down.bias[:keep])
            new.up.weight[:, :keep].copy_(self.up.weight[:, :keep])
            new.up.bias.copy_(self.up.bias)
        new.requires_grad_(self.down.weight.requires_grad)
        return new
