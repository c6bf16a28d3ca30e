"""Heterogeneous LoRA's client half: a client trains the first ``r_c`` ranks its device is given.

:class:`HeterogeneousLoRA` builds the server half (:class:`~.strategy.HeteroLoRAStrategy`) from a rank per
device profile of the run's fleet (``federation.cost_model.fleet``). At a client's start it cuts every LoRA
layer's factors to the client's rank (new, smaller parameters, so the optimizer, the FLOP count and the
memory are those of rank ``r_c``; the scaling stays ``lora_alpha / r``, so the cut model is the global one
without its last ranks), and at its end it puts the untrained ranks back as they came, so the update has
the global state's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm, FederatedRun
from lightning_fedpeft.cost import check_memory, priced_model
from lightning_fedpeft.hetlora.strategy import RULES, HeteroLoRAStrategy

ADAPTER = "default"


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers of ``model`` by qualified name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


class RankCut:
    """Cuts LoRA layers to their first ``rank`` ranks, and puts the full factors back (trained part kept)."""

    def __init__(self, model: nn.Module, rank: int) -> None:
        self.rank = rank
        self.saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers = lora_layers(model)
        for name, layer in self.layers.items():
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            if rank >= a.weight.shape[0]:
                continue
            self.saved[name] = a.weight.detach().clone(), b.weight.detach().clone()
            a.weight = nn.Parameter(a.weight.detach()[:rank].clone(), requires_grad=a.weight.requires_grad)
            b.weight = nn.Parameter(b.weight.detach()[:, :rank].clone(), requires_grad=b.weight.requires_grad)

    def restore(self) -> None:
        """Full-rank factors again: the first ``rank`` ranks as trained, the others as they were."""
        for name, (full_a, full_b) in self.saved.items():
            layer = self.layers[name]
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            full_a = full_a.to(a.weight.device, a.weight.dtype)
            full_b = full_b.to(b.weight.device, b.weight.dtype)
            full_a[: self.rank] = a.weight.detach()
            full_b[:, : self.rank] = b.weight.detach()
            a.weight = nn.Parameter(full_a, requires_grad=a.weight.requires_grad)
            b.weight = nn.Parameter(full_b, requires_grad=b.weight.requires_grad)
        self.saved = {}


class HeterogeneousLoRA(FederatedAlgorithm):
    """LoRA with a fixed rank per device profile, aggregated without zero-padding bias (or with it).

    Needs LoRA layers (``model.method='lora'``, or a user's module holding a peft LoRA model) and a fleet
    (``federation.cost_model.fleet``). The model's LoRA rank is the largest; each device's rank is at most it.

    Args:
        ranks: the rank each device profile of the fleet trains, e.g. ``{rpi4b: 2, orin_nano: 8}``.
        rule: ``per_coordinate`` (default: every coordinate averaged over the clients that trained it) or
            ``zero_pad`` (HetLoRA's zero-padding, the baseline); see :mod:`~.strategy`.
    """

    sizes_per_client = True

    def __init__(self, ranks: Mapping[str, int], rule: str = "per_coordinate") -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"hetero_lora.rule={rule!r} must be one of {', '.join(RULES)}")
        if not ranks:
            raise ValueError("hetero_lora.ranks is empty: give a rank per device profile, e.g. {rpi4b: 2, tx2: 8}")
        for device, rank in ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"hetero_lora.ranks[{device!r}]={rank!r} must be a whole number >= 1")
        self.ranks = dict(ranks)
        self.rule = rule
        self.strategy: HeteroLoRAStrategy | None = None
        self._cut: RankCut | None = None

    def configure(self, run: FederatedRun) -> HeteroLoRAStrategy:
        model = priced_model(run.pl_module)  # FedPEFTModule's model, or the peft model inside a user's own module
        layers = lora_layers(model)
        if not layers:
            raise ValueError("HeterogeneousLoRA needs LoRA layers: set model.method='lora' (peft's LoRA)")
        widest = max(layer.lora_A[ADAPTER].weight.shape[0] for layer in layers.values())
        cost = run.cost_model
        if cost is None or not cost.client_devices:
            raise ValueError(
                "HeterogeneousLoRA gives each device profile its rank, so it needs a fleet: set "
                "federation.cost_model.fleet (e.g. {fractions: {rpi4b: 0.5, tx2: 0.5}})"
            )
        used = list(dict.fromkeys(cost.client_devices))
        missing = [d for d in used if d not in self.ranks]
        if missing:
            raise ValueError(f"hetero_lora.ranks gives no rank to the fleet's device profile(s) {missing}; add them")
        too_wide = {d: r for d, r in self.ranks.items() if r > widest}
        if too_wide:
            raise ValueError(
                f"hetero_lora.ranks {too_wide} exceed the model's LoRA rank {widest}; raise model.rank (the largest "
                f"rank, which the global state holds) or lower them"
            )
        batch = {k: v.to(run.pl_module.device) for k, v in run.sample_batch().items()}
        for device in used:  # each device must hold the training of its own rank
            cut = RankCut(model, self.ranks[device])
            try:
                what = f"LoRA rank {self.ranks[device]} (hetero_lora.ranks)"
                check_memory(cost, model, batch, what, profiles=[cost.profiles[device]])
            finally:
                cut.restore()
        self.strategy = HeteroLoRAStrategy(
            run.clients_per_round, [self.ranks[d] for d in cost.client_devices], self.rule, seed=run.seed
        )
        return self.strategy

    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        rank = ctx.instructions.get("lora_rank")
        if rank is None:
            raise RuntimeError(
                f"round {ctx.round}: client {ctx.client_id} was told no LoRA rank; is the server running "
                f"HeterogeneousLoRA too?"
            )
        self._cut = RankCut(getattr(pl_module, "model", pl_module), int(rank))

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        if self._cut is not None:
            self._cut.restore()
            self._cut = None
        return ClientResult(metrics={"client_rank": float(ctx.instructions.get("lora_rank", 0))})
