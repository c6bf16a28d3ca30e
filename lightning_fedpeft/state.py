"""The trainable state: the flat, named set of tensors that federated rounds exchange.

Only parameters with ``requires_grad`` travel. The frozen backbone never leaves the process, which is
what makes parameter-efficient federated learning cheap on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from lightning_fedpeft.protocol import TrainableState

# A tensor's transformer layer in its name: BERT's ".layer.3.", Llama's ".layers.3.", GPT-2's ".h.3.".
_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer layer a state tensor (or module) named ``name`` belongs to, if its name says."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def trainable_state(module: nn.Module) -> TrainableState:
    """Return a detached copy of every trainable parameter of ``module``, keyed by its qualified name."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def to_host(state: Mapping[str, torch.Tensor]) -> TrainableState:
    """``state`` as it leaves a process: on the CPU, and half-precision floats (bf16-true, fp16 models)
    widened to float32, so the server aggregates, and the wire carries, the same tensors whatever device or
    precision a client trains in. CPU tensors of float32 and wider are returned as they are (no copy)."""
    out: TrainableState = {}
    for name, tensor in state.items():
        dtype = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
        out[name] = tensor.to(device="cpu", dtype=dtype)
    return out


def require_host(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` if a tensor of ``tensors`` is not on the CPU: the transport carries CPU tensors only."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu":
            raise ValueError(
                f"{what} {name!r} is on {tensor.device}; only CPU tensors travel between client and server "
                f"(move it with lightning_fedpeft.state.to_host before it is sent)"
            )


def host_trainable_state(module: nn.Module) -> TrainableState:
    """The trainable state of ``module`` as it leaves the process (:func:`to_host` of a detached copy)."""
    return to_host(trainable_state(module))


def load_trainable_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the matching trainable parameters of ``module`` in place.

    In-place copies keep the parameter objects (and so any optimizer or hook that refers to them) valid,
    and move each tensor to its parameter's device and dtype (a CPU state into a model on a GPU).
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
