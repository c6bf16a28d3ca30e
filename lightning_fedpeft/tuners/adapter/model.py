"""Injecting bottleneck adapters into a Hugging Face transformer, and changing their depth and width."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_fedpeft.tuners.adapter.config import AdapterConfig
from lightning_fedpeft.tuners.adapter.layer import BottleneckAdapter


def find_transformer_layers(model: nn.Module) -> nn.ModuleList:
    """Return the stack of transformer layers: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries.

    Looking it up by shape rather than by name keeps this working for BERT, RoBERTa, MPNet and friends.
    """
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (num_layers is None or len(module) == num_layers):
            return module
    raise ValueError("could not find the transformer layer stack (an nn.ModuleList of num_hidden_layers layers)")


@dataclass
class AdapterInjection:
    """Handle on the adapters put into a model: which layers have one, their width, and the hooks.

    The adapters always sit in the top ``depth`` layers and all have the same ``width``: that pair is the
    configuration, and it fixes the names and shapes of the trainable state.
    """

    model: nn.Module
    config: AdapterConfig
    layers: nn.ModuleList
    parents: dict[int, nn.Module] = field(default_factory=dict)
    handles: dict[int, RemovableHandle] = field(default_factory=dict)

    @property
    def adapters(self) -> dict[int, BottleneckAdapter]:
        """The adapters by transformer-layer index."""
        return {idx: parent.adapter for idx, parent in self.parents.items()}

    @property
    def depth(self) -> int:
        return len(self.parents)

    @property
    def width(self) -> int:
        return self.config.width

    def resize(self, depth: int, width: int, generator: torch.Generator | None = None) -> None:
        """Change the configuration in place, preserving the function when growing.

        Wider: every adapter keeps its trained units and gains new ones with zero up-projection. Deeper:
        layers below the current ones get fresh adapters (zero up-projection, so each is the identity).
        Narrower or shallower (going back to a smaller trial configuration) drops units or adapters;
        load the target configuration's state afterwards. New adapters are trainable, as are kept ones.
        """
        AdapterConfig(depth=depth, width=width, ffn_output=self.config.ffn_output).validate(len(self.layers))
        n = len(self.layers)
        for idx in sorted(self.parents):
            if idx < n - depth:  # shallower: remove
                self.handles.pop(idx).remove()
                del self.parents.pop(idx).adapter
        for parent in self.parents.values():
            if parent.adapter.width != width:
                parent.adapter = parent.adapter.resized(width, generator=generator)
        for idx in range(n - depth, n):
            if idx not in self.parents:
                self._add(idx, width, generator)
        self.config = AdapterConfig(depth=depth, width=width, ffn_output=self.config.ffn_output)

    def _add(self, idx: int, width: int, generator: torch.Generator | None) -> None:
        layer = self.layers[idx]
        parent_path = self.config.ffn_output.rpartition(".")[0]
        try:
            target = layer.get_submodule(self.config.ffn_output)
            parent = layer.get_submodule(parent_path) if parent_path else layer
        except AttributeError as err:
            raise ValueError(
                f"adapter ffn_output={self.config.ffn_output!r} is not a submodule of transformer layer {idx}; "
                f"set it to the path of the feed-forward output projection (BERT: 'output.dense')"
            ) from err
        ref = target.weight
        adapter = BottleneckAdapter(self.model.config.hidden_size, width, generator=generator)
        # A quantized projection's weight is packed integers: the adapter then keeps float32 weights.
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        parent.add_module("adapter", adapter.to(device=ref.device, dtype=dtype))
        self.parents[idx] = parent
        self.handles[idx] = target.register_forward_hook(_apply_adapter(parent))


def inject_adapters(model: nn.Module, config: AdapterConfig) -> AdapterInjection:
    """Insert an adapter after the feed-forward block of each of the top ``config.depth`` layers.

    The adapter is registered as a child of the feed-forward output module's parent (``...output.adapter``)
    and applied by a forward hook on the output projection, so backbone parameter names stay unchanged and
    pre-trained checkpoints still load. Trainability is left to the caller.
    """
    layers = find_transformer_layers(model)
    config.validate(len(layers))
    injection = AdapterInjection(model=model, config=config, layers=layers)
    for idx in range(len(layers) - config.depth, len(layers)):
        injection._add(idx, config.width, None)
    return injection


def _apply_adapter(parent: nn.Module):
    # Look the adapter up at call time so that replacing ``parent.adapter`` (e.g. a wider one) takes effect.
    def hook(_module: nn.Module, _inputs: tuple, output):
        return parent.adapter(output)

    return hook


ADAPTER_KEY = ".adapter."


def adapter_config_of_state(state: dict[str, torch.Tensor], num_layers: int) -> tuple[int, int]:
    """Read ``(depth, width)`` off a trainable state's adapter tensor names and shapes.

    Raises ``ValueError`` if the adapters are not the top layers or do not share one width.
    """
    layers: set[int] = set()
    widths: set[int] = set()
    for name, tensor in state.items():
        if ADAPTER_KEY not in name:
            continue
        prefix = name.split(ADAPTER_KEY)[0]
        idx = next((int(p) for p in reversed(prefix.split(".")) if p.isdigit()), None)
        if idx is None:
            raise ValueError(f"adapter tensor {name!r} names no layer index")
        layers.add(idx)
        if name.endswith("down.weight"):
            widths.add(int(tensor.shape[0]))
    depth = len(layers)
    if layers != set(range(num_layers - depth, num_layers)):
        raise ValueError(f"adapters sit in layers {sorted(layers)}, not the top {depth} of {num_layers}")
    if len(widths) > 1:
        raise ValueError(f"adapters have different widths {sorted(widths)}")
    return depth, widths.pop() if widths else 0
