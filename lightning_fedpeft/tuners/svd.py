"""What FedARA needs on top of peft's AdaLoRA layers: triplets that shrink, modules that go, packed states.

The SVD math (``ΔW = P · Λ · Q · scaling / r_init`` with the orthogonality penalty) is peft's
:class:`~peft.tuners.adalora.layer.SVDLinear`; its ``lora_B`` is P (out × r), ``lora_E`` is Λ (r × 1) and
``lora_A`` is Q (r × in). peft masks a triplet by zeroing its Λ entry and keeps it in memory, in the
backward pass and (for us) on the wire. Federated rank allocation wants the opposite, so this module adds
the three things peft does not have:

* :func:`set_rank`: cut a layer to the active triplets (new, smaller parameters; ``ranknum`` keeps
  ``r_init`` so the scaling of the surviving triplets does not change);
* :func:`prune_layer`: put the frozen base layer back in the SVD layer's place, so the module no longer runs,
  owns no parameters and sends nothing;
* :func:`pack` / :func:`unpack`: the state with only the active triplets (what travels) from the full
  ``r_init`` state the server keeps, and back.

peft's own resizing (``resize_modules_by_rank_pattern``) re-initialises the layer and resets ``ranknum``,
which changes the function of the surviving triplets, so it is not used here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_fedpeft.protocol import TrainableState

ADAPTER = "default"  # peft's adapter name; FedPEFTModule builds one adapter
_E, _A, _B = f".lora_E.{ADAPTER}", f".lora_A.{ADAPTER}", f".lora_B.{ADAPTER}"


def svd_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The live SVD layers of ``model`` by qualified name (names as in ``model.named_parameters``)."""
    from peft.tuners.adalora.layer import AdaLoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, AdaLoraLayer) and ADAPTER in m.lora_E}


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty, ``mean over P and Q of ||P^T P - I||_F`` and ``||Q Q^T - I||_F``.

    peft adds the same value to the loss inside its model's forward, one small matrix product, identity and
    norm per factor: about a thousand kernel launches a step on a 16-layer decoder with seven adapted kinds,
    which on a GPU cost more than the layers' own work. Here the factors of one shape go through one batched
    product and one batched norm (a few dozen launches); the value is the same up to float rounding.
    """
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    count = 0
    for layer in svd_layers(model).values():
        for factor in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER].T):  # Q (r x in), P^T (r x out)
            groups.setdefault(tuple(factor.shape), []).append(factor)
            count += 1
    if not count:
        return torch.zeros(())
    total = None
    for (rank, _), factors in groups.items():
        stacked = torch.stack(factors)
        cov = stacked @ stacked.transpose(1, 2)
        eye = torch.eye(rank, dtype=cov.dtype, device=cov.device)
        norms = torch.linalg.matrix_norm(cov - eye).sum()
        total = norms if total is None else total + norms
    return total / count


def layer_rank(layer: nn.Module) -> int:
    """Triplets the layer holds now."""
    return int(layer.lora_E[ADAPTER].shape[0])


def module_names_in_state(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Qualified names of the SVD modules whose triplets ``state`` carries (in the state's order)."""
    return [key[: -len(_E)] for key in state if key.endswith(_E)]


def state_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Triplets per SVD module in ``state``."""
    return {name: int(state[name + _E].shape[0]) for name in module_names_in_state(state)}


def triplet_keys(module: str) -> tuple[str, str, str]:
    """The state keys of a module's Λ, Q and P."""
    return module + _E, module + _A, module + _B


def set_rank(layer: nn.Module, rank: int) -> None:
    """Give ``layer`` room for ``rank`` triplets (zeros: the caller loads the values next).

    New parameter objects replace the old ones, so an optimizer built before this call must be rebuilt
    (RoundSync builds one per client anyway). ``ranknum`` stays at ``r_init``.
    """
    if rank < 0:
        raise ValueError(f"rank={rank} must be >= 0")
    if rank == layer_rank(layer):
        return
    old_a, old_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    kw = {"device": old_a.device, "dtype": old_a.dtype}
    layer.lora_A[ADAPTER] = nn.Parameter(torch.zeros(rank, old_a.shape[1], **kw), requires_grad=old_a.requires_grad)
    layer.lora_E[ADAPTER] = nn.Parameter(torch.zeros(rank, 1, **kw), requires_grad=old_a.requires_grad)
    layer.lora_B[ADAPTER] = nn.Parameter(torch.zeros(old_b.shape[0], rank, **kw), requires_grad=old_b.requires_grad)
    layer.r[ADAPTER] = rank


def prune_layer(model: nn.Module, name: str) -> nn.Module:
    """Replace the SVD layer ``name`` of ``model`` by its frozen base layer; return the removed layer.

    Afterwards the SVD layer is not called any more (a forward hook on it stays silent), its parameters
    are gone from ``model.parameters()`` (so from the optimizer and the trainable state), and if no
    trainable parameter is left below some transformer layer, autograd records nothing there: the
    backward pass stops at the lowest layer that still has one.
    """
    layer = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer.get_base_layer())
    return layer


def adopt_state_ranks(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Make ``model``'s SVD layers hold what ``state`` carries: resize each layer to the state's rank and
    prune the layers the state no longer has. ``prefix`` is what the state's keys add to ``model``'s names
    (``"model."`` for a :class:`~lightning_fedpeft.FedPEFTModule`'s ``model``).

    A state without any SVD triplet (e.g. only a classifier) is taken to be a state from another kind of
    model and changes nothing.
    """
    ranks = state_ranks(state)
    if not ranks:
        return
    for name, layer in svd_layers(model).items():
        key = prefix + name
        if key in ranks:
            set_rank(layer, ranks[key])
        else:
            prune_layer(model, name)


class TripletCut:
    """Cut ``model``'s SVD layers to the triplets ``keep`` names (module -> positions among its current
    triplets; a module not named keeps none), and later put the others back.

    A client of a fleet trains such a prefix: the cut layers are new, smaller parameters (so the optimizer,
    the FLOP count and the memory are the prefix's), a layer left with no triplet is frozen at rank 0 (it
    adds nothing and needs no gradient, so backward stops above it if nothing lower trains), and
    :meth:`restore` rebuilds every layer at its former rank: the kept triplets as trained, the others as
    they were. ``keep`` uses the names of ``model.named_modules()`` (the trainable state's module names
    when ``model`` is the LightningModule).
    """

    def __init__(self, model: nn.Module, keep: Mapping[str, list[int]]) -> None:
        self.saved: dict[str, tuple[nn.Module, list[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor], bool]] = {}
        for name, layer in svd_layers(model).items():
            idx = sorted(int(i) for i in keep.get(name, []))
            rank = layer_rank(layer)
            if idx and idx == list(range(rank)):
                continue  # kept whole (a layer with no triplet at all is frozen below, as one cut to none)
            e, a, b = layer.lora_E[ADAPTER], layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            full = (e.detach().clone(), a.detach().clone(), b.detach().clone())
            self.saved[name] = (layer, idx, full, a.requires_grad)
            set_rank(layer, len(idx))
            with torch.no_grad():
                layer.lora_E[ADAPTER].copy_(full[0][idx])
                layer.lora_A[ADAPTER].copy_(full[1][idx])
                layer.lora_B[ADAPTER].copy_(full[2][:, idx])
            if not idx:
                for factor in (layer.lora_E, layer.lora_A, layer.lora_B):
                    factor[ADAPTER].requires_grad_(False)

    def restore(self) -> None:
        """Every cut layer at its former rank: kept triplets as trained now, the others as before the cut."""
        for layer, idx, (e, a, b), trainable in self.saved.values():
            trained = (layer.lora_E[ADAPTER].detach(), layer.lora_A[ADAPTER].detach(), layer.lora_B[ADAPTER].detach())
            set_rank(layer, e.shape[0])
            with torch.no_grad():
                e, a, b = e.to(trained[0].device), a.to(trained[1].device), b.to(trained[2].device)
                e[idx], a[idx], b[:, idx] = trained[0], trained[1], trained[2]
                layer.lora_E[ADAPTER].copy_(e)
                layer.lora_A[ADAPTER].copy_(a)
                layer.lora_B[ADAPTER].copy_(b)
            for factor in (layer.lora_E, layer.lora_A, layer.lora_B):
                factor[ADAPTER].requires_grad_(trainable)
        self.saved = {}


def pack(full: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], drop_empty: bool) -> TrainableState:
    """The state that travels: every non-SVD tensor as is, and per SVD module only its active triplets.

    ``masks[module]`` is a bool vector over the module's ``r_init`` triplets. A module without an
    active triplet is left out when ``drop_empty`` (it has been pruned), else kept with zero-size tensors.
    """
    out: TrainableState = {}
    for key, tensor in full.items():
        module = _module_of(key)
        if module is None or module not in masks:
            out[key] = tensor.clone()
            continue
        mask = masks[module]
        if drop_empty and not bool(mask.any()):
            continue
        idx = mask.nonzero().flatten()
        out[key] = tensor[:, idx].clone() if key.endswith(_B) else tensor[idx].clone()
    return out


def unpack(
    packed: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]
) -> TrainableState:
    """The full ``r_init`` state rebuilt from a packed one: active triplets from ``packed``, the masked
    ones (and pruned modules) keep the values they have in ``full``.
    """
    out: TrainableState = {}
    for key, ref in full.items():
        module = _module_of(key)
        if module is None or module not in masks:
            out[key] = packed[key].clone()
            continue
        tensor = ref.clone()
        mask = masks[module]
        if key in packed:
            idx = mask.nonzero().flatten()
            if key.endswith(_B):
                tensor[:, idx] = packed[key]
            else:
                tensor[idx] = packed[key]
        out[key] = tensor
    return out


def _module_of(key: str) -> str | None:
    for suffix in (_E, _A, _B):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None
