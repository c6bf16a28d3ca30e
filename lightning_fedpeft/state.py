"""The trainable state: the flat, named set of tensors that federated rounds exchange.

Only parameters with ``requires_grad`` travel. The frozen backbone never leaves the process, which is
what makes parameter-efficient federated learning cheap on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_fedpeft.protocol import TrainableState


def trainable_state(module: nn.Module) -> TrainableState:
    """Return a detached copy of every trainable parameter of ``module``, keyed by its qualified name."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the matching trainable parameters of ``module`` in place.

    In-place copies keep the parameter objects (and so any optimizer or hook that refers to them) valid.
    Raises ``KeyError`` naming the first missing or unexpected tensor, and ``ValueError`` on a shape
    mismatch, before anything is written.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"trainable state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"trainable state tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors of ``state`` occupy (what a client sends or receives for them)."""
    return sum(t.numel() * t.element_size() for t in state.values())
