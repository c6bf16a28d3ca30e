"""Injecting bottleneck adapters into a Hugging Face transformer."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Handle on the adapters put into a model: the adapters by layer index and their forward hooks."""

    adapters: dict[int, BottleneckAdapter] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def inject_adapters(model: nn.Module, config: AdapterConfig) -> AdapterInjection:
    """Insert an adapter after the feed-forward block of each of the top ``config.depth`` layers.

    The adapter is registered as a child of the feed-forward output module's parent (``...output.adapter``)
    and applied by a forward hook on the output projection, so backbone parameter names stay unchanged and
    pre-trained checkpoints still load. Trainability is left to the caller.
    """
    layers = find_transformer_layers(model)
    config.validate(len(layers))
    hidden = model.config.hidden_size
    injection = AdapterInjection()
    parent_path = config.ffn_output.rpartition(".")[0]
    for idx in range(len(layers) - config.depth, len(layers)):
        layer = layers[idx]
        try:
            target = layer.get_submodule(config.ffn_output)
            parent = layer.get_submodule(parent_path) if parent_path else layer
        except AttributeError as err:
            raise ValueError(
                f"adapter ffn_output={config.ffn_output!r} is not a submodule of transformer layer {idx}; "
                f"set it to the path of the feed-forward output projection (BERT: 'output.dense')"
            ) from err
        adapter = BottleneckAdapter(hidden, config.width)
        parent.add_module("adapter", adapter)
        injection.adapters[idx] = adapter
        injection.handles.append(target.register_forward_hook(_apply_adapter(parent)))
    return injection


def _apply_adapter(parent: nn.Module):
    # Look the adapter up at call time so that replacing ``parent.adapter`` (e.g. a wider one) takes effect.
    def hook(_module: nn.Module, _inputs: tuple, output):
        return parent.adapter(output)

    return hook
