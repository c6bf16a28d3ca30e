"""The trainable state: the flat, named set of tensors that federated rounds exchange.

Only parameters with ``requires_grad`` travel. The frozen backbone never leaves the process, which is
what makes parameter-efficient federated learning cheap on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

TrainableState = dict[str, torch.Tensor]


def trainable_state(module: nn.Module) -> TrainableState:
    """Return a detached copy of every trainable parameter of ``module``, keyed by its qualified name."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the parameters that would travel, in registration order."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


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


def state_numel(state: Mapping[str, torch.Tensor]) -> int:
    """Number of scalar values in ``state``."""
    return sum(t.numel() for t in state.values())


COMPRESSIONS: tuple[str, ...] = ("none", "int8")


def compress(
    state: Mapping[str, torch.Tensor], compression: str, reference: Mapping[str, torch.Tensor] | None = None
) -> tuple[TrainableState, int]:
    """What the receiver gets after ``state`` crosses the wire, and how many bytes crossed it.

    ``int8``: each float tensor is quantized symmetrically to int8 with one float32 scale
    (``scale = max|x| / 127``) and dequantized on arrival, so the values carry the quantization error and
    the wire carries one byte per value plus four per tensor. With a ``reference`` that both sides hold
    (the state the client received, or the run's starting state), what is quantized is the difference
    ``state - reference``, and the receiver adds the reference back: quantizing pre-trained weights
    themselves each round (embeddings, layer norms) destroys them, while their change is small and
    quantizes well. ``none``: unchanged, full size.
    """
    if compression == "none":
        return dict(state), state_nbytes(state)
    if compression != "int8":
        raise ValueError(f"compression={compression!r} is unknown; allowed: {', '.join(COMPRESSIONS)}")
    out: TrainableState = {}
    nbytes = 0
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            nbytes += tensor.numel() * tensor.element_size()
            continue
        base = None if reference is None else reference.get(name)
        if base is not None and base.shape != tensor.shape:
            base = None  # the configuration changed shape: send the values themselves
        value = tensor if base is None else tensor - base
        scale = value.abs().max().clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        q = torch.clamp(torch.round(value / scale), -127, 127).to(torch.int8)
        received = q.to(tensor.dtype) * scale
        out[name] = (received if base is None else base + received).to(tensor.dtype)
        nbytes += q.numel() + 4
    return out, nbytes
