"""What a state looks like on the wire: the transport's encode and decode step (``federation.compression``).

``none`` sends tensors as they are. ``int8`` quantizes each float tensor symmetrically to int8 with one
float32 scale (``scale = max|x| / 127``): one byte per value plus four per tensor on the wire, and the
receiver's values carry the quantization error. With a ``reference`` that both sides hold (the run's
starting state for the download, the state the client received for the upload), what is quantized is
the difference ``state - reference``: quantizing pre-trained weights themselves each round (embeddings,
layer norms) destroys them, while their change is small and quantizes well. A tensor whose reference has
another shape (the configuration changed) is sent as its values.

A client's whole update goes through :meth:`Codec.encode_update`: its state as above, and the tensors an
algorithm sends beside it (FedARA's importance per triplet) always as their values: they are small, and
their exact order is what the server acts on. This is also the one place that checks that what leaves a
process is on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from lightning_fedpeft.protocol import ClientUpdate, TrainableState
from lightning_fedpeft.state import require_host

COMPRESSIONS: tuple[str, ...] = ("none", "int8")


@dataclass
class WireTensor:
    """One tensor as sent: its values, or int8 codes with their scale (of the difference from a reference)."""

    values: torch.Tensor
    scale: torch.Tensor | None = None  # set when ``values`` are int8 codes
    relative: bool = False  # the codes are of ``tensor - reference``


@dataclass
class WireState:
    """A state as sent, and its size on the wire in bytes."""

    tensors: dict[str, WireTensor]
    nbytes: int


@dataclass
class WireUpdate:
    """A client's update as sent: its numbers as they are, its state encoded, the tensors beside it as values."""

    update: ClientUpdate  # client, round, examples and metrics; its state and tensors travel below
    state: WireState
    tensors: WireState

    @property
    def nbytes(self) -> int:
        """What the update's tensors take on the wire."""
        return self.state.nbytes + self.tensors.nbytes


class Codec:
    """Encodes states for the wire and decodes them on arrival (see the module docstring)."""

    def __init__(self, compression: str = "none") -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"federation.compression={compression!r} is unknown; allowed: {', '.join(COMPRESSIONS)}")
        self.compression = compression

    def encode(
        self, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None
    ) -> WireState:
        """``state`` as it goes on the wire."""
        require_host(state, "tensor")
        return self._encode(state, reference)

    def encode_update(self, update: ClientUpdate, reference: Mapping[str, torch.Tensor] | None = None) -> WireUpdate:
        """``update`` as it goes on the wire; ``reference``: the state the client received."""
        require_host(update.state, "tensor")
        require_host(update.tensors, "tensor beside the state")
        tensors = {name: WireTensor(t) for name, t in update.tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in update.tensors.values() if isinstance(t, torch.Tensor))
        side = WireState(tensors, nbytes)  # a non-tensor is refused by the server, naming it
        return WireUpdate(replace(update, state={}, tensors={}), self._encode(update.state, reference), side)

    def decode_update(self, wire: WireUpdate, reference: Mapping[str, torch.Tensor] | None = None) -> ClientUpdate:
        """The update the server gets from ``wire`` (``reference``: the state the client received)."""
        return replace(wire.update, state=self.decode(wire.state, reference), tensors=self.decode(wire.tensors))

    def _encode(self, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None) -> WireState:
        out: dict[str, WireTensor] = {}
        nbytes = 0
        for name, tensor in state.items():
            if self.compression == "none" or not tensor.is_floating_point():
                out[name] = WireTensor(tensor)
                nbytes += tensor.numel() * tensor.element_size()
                continue
            base = None if reference is None else reference.get(name)
            relative = base is not None and base.shape == tensor.shape
            value = tensor - base if relative else tensor
            scale = value.abs().max().clamp(min=torch.finfo(torch.float32).tiny) / 127.0
            codes = torch.clamp(torch.round(value / scale), -127, 127).to(torch.int8)
            out[name] = WireTensor(codes, scale, relative)
            nbytes += codes.numel() + 4
        return WireState(out, nbytes)

    @staticmethod
    def decode(wire: WireState, reference: Mapping[str, torch.Tensor] | None = None) -> TrainableState:
        """The state the receiver gets from ``wire`` (``reference``: the one the sender encoded against)."""
        out: TrainableState = {}
        for name, sent in wire.tensors.items():
            if sent.scale is None:
                out[name] = sent.values
                continue
            dtype = sent.scale.dtype if not sent.relative else reference[name].dtype  # type: ignore[index]
            received = sent.values.to(dtype) * sent.scale
            out[name] = (reference[name] + received).to(dtype) if sent.relative else received  # type: ignore[index]
        return out
