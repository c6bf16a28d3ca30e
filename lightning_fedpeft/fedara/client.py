"""FedARA's client half: importance values during local training, and pruning of modules left without rank.

:class:`RankAllocation` builds the server half (:class:`~lightning_fedpeft.fedara.strategy.RankAllocationStrategy`)
and, on every client the plan tells to (instruction ``importance``), keeps peft's sensitivity and
uncertainty averages over the local steps (``I = |θ ∂L/∂θ|``, β1 = β2 = 0.85) and uploads with the update
one importance value per active triplet (``s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``, as AdaLoRA scores it).
:class:`ModulePruning` has the server drop a module with no active triplet from the global state; clients
then put the frozen base layer back in its place, so it no longer runs, trains or travels, and once no
adapted module is left below a transformer layer, backward stops there.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm, FederatedRun, load_state
from lightning_fedpeft.cost import check_memory, priced_model
from lightning_fedpeft.fedara.strategy import (
    IMPORTANCE,
    BudgetSchedule,
    PrefixCosts,
    RankAllocationStrategy,
    prefix_masks,
)
from lightning_fedpeft.protocol import TrainableState
from lightning_fedpeft.resources import ClientResources
from lightning_fedpeft.state import host_trainable_state
from lightning_fedpeft.strategy import Query
from lightning_fedpeft.tuners.svd import (
    ADAPTER,
    TripletCut,
    adopt_state_ranks,
    layer_rank,
    state_ranks,
    svd_layers,
    triplet_keys,
)


class RankAllocation(FederatedAlgorithm):
    """FedARA's federated rank allocation, on top of :class:`~lightning_fedpeft.RoundSync`.

    Needs SVD layers: :class:`~lightning_fedpeft.FedPEFTModule` with ``model.method='svd'``, or a user's own
    LightningModule holding a peft AdaLoRA model, whose layers this callback resizes and prunes to each
    state it gets (:meth:`adopt_state`). Each round's budget, active ranks
    and live modules go to ``rounds.csv``; the server's state (full triplets, mask, scores, schedule
    position) rides in RoundSync's checkpoint state.

    Args:
        target_rank: the average rank per module at the end (the budget falls to ``target_rank x modules``).
        total_rounds: the schedule's length in rounds (default: ``trainer.max_epochs``).
        warmup_rounds: rounds at the full budget before any masking.
        final_rounds: rounds at the end with the mask frozen.
        mask_every: re-allocate every this many rounds during the fall.
        importance_beta: smoothing of the server's score over rounds (0: only the latest round counts).
        beta1 / beta2: AdaLoRA's smoothing of sensitivity and uncertainty over local steps.
        fleet_budgets: on a fleet (``federation.cost_model.fleet``), give every client a nested prefix of the
            active triplets sized to its device and the round's time budget (``fleet.round_budget_s``);
            ``False``: every client trains every active triplet (the uniform configuration).
    """

    def __init__(
        self,
        target_rank: float = 2.0,
        total_rounds: int | None = None,
        warmup_rounds: int = 2,
        final_rounds: int = 2,
        mask_every: int = 1,
        importance_beta: float = 0.5,
        beta1: float = 0.85,
        beta2: float = 0.85,
        fleet_budgets: bool = True,
    ) -> None:
        super().__init__()
        if target_rank < 0:
            raise ValueError(f"allocation.target_rank={target_rank} must be >= 0")
        if total_rounds is not None and total_rounds < 1:
            raise ValueError(f"allocation.total_rounds={total_rounds} must be at least 1 (or null: trainer.max_epochs)")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"allocation.{name}={value} must be within (0, 1)")
        if mask_every < 1:
            raise ValueError(f"allocation.mask_every={mask_every} must be at least 1")
        self.target_rank = target_rank
        self.total_rounds = total_rounds
        self.warmup_rounds = warmup_rounds
        self.final_rounds = final_rounds
        self.mask_every = mask_every
        self.importance_beta = importance_beta
        self.beta1, self.beta2 = beta1, beta2
        self.fleet_budgets = fleet_budgets
        self.strategy: RankAllocationStrategy | None = None
        self._run: FederatedRun | None = None
        self._cut: TripletCut | None = None
        self._keep: dict[str, list[int]] | None = None
        self._allocator: Any = None
        self._scoring = False  # the current client was told to upload importance

    def configure(self, run: FederatedRun) -> RankAllocationStrategy:
        pl_module = run.pl_module
        model = getattr(pl_module, "model", pl_module)
        layers = svd_layers(model)
        if not layers:
            raise ValueError("RankAllocation needs SVD layers: set model.method='svd' (peft's AdaLoRA layers)")
        r_init = {int(round(float(layer.ranknum["default"]))) for layer in layers.values()}
        if len(r_init) != 1:
            raise ValueError(f"RankAllocation needs one r_init for every SVD layer, found {sorted(r_init)}")
        total = self.total_rounds if self.total_rounds is not None else run.trainer.max_epochs
        if total is None or total < 1:
            raise ValueError("RankAllocation needs allocation.total_rounds or a positive trainer.max_epochs")
        init_budget = r_init.pop() * len(layers)
        schedule = BudgetSchedule(
            init_budget=init_budget,
            target_budget=min(init_budget, int(round(self.target_rank * len(layers)))),
            total_rounds=total,
            warmup_rounds=self.warmup_rounds,
            final_rounds=self.final_rounds,
        )
        if not _holds_adalora(pl_module):
            raise ValueError(
                "RankAllocation needs a peft AdaLoRA model in the LightningModule (model.method='svd', or your "
                "own module holding peft.get_peft_model(..., AdaLoraConfig(...)))"
            )
        self._allocator = SensitivityAverages(self.beta1, self.beta2)
        self._run = run
        cost = run.cost_model
        on_fleet = self.fleet_budgets and cost is not None and bool(cost.client_devices)
        self.sizes_per_client = on_fleet
        fleet = cost.fleet if on_fleet else None

        def build() -> RankAllocationStrategy:
            return RankAllocationStrategy(
                run.clients_per_round,
                schedule,
                mask_every=self.mask_every,
                importance_beta=self.importance_beta,
                prune_empty=run.find(ModulePruning) is not None,
                seed=run.seed,
                client_devices=cost.client_devices if on_fleet else None,
                device_memory_gb={p.name: p.memory_gb for p in cost.fleet_profiles()} if on_fleet else None,
                round_budget_s=fleet.round_budget_s if fleet is not None else None,
            )

        self.strategy = build()
        if on_fleet:  # the smallest prefix must fit every device: say so now, not in round 1
            probe = build()
            probe.start(host_trainable_state(pl_module))
            sizes, prefixes = probe.candidate_prefixes()
            cut = TripletCut(pl_module, prefixes[-1])
            try:
                batch = {k: v.to(pl_module.device) for k, v in run.sample_batch().items()}
                check_memory(cost, priced_model(pl_module), batch, f"FedARA's smallest prefix ({sizes[-1]} triplets)")
            finally:
                cut.restore()
        return self.strategy

    # -- the server's question on a fleet: what each candidate prefix costs ------------------------------------
    def answer_query(self, query: Query, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if not isinstance(query, PrefixCosts):
            return super().answer_query(query, trainer, pl_module)
        run = self._run
        assert run is not None and run.cost_model is not None
        cost = run.cost_model
        load_state(pl_module, query.state, [self])
        model = priced_model(pl_module)
        batch = {k: v.to(pl_module.device) for k, v in run.sample_batch().items()}
        cache = getattr(pl_module, "activation_cache", None)
        answers = []
        for prefix in query.prefixes:
            masks = prefix_masks(query.state, prefix)
            held = sum(
                int(masks[k].expand(t.shape).sum()) * t.element_size() if k in masks else t.numel() * t.element_size()
                for k, t in query.state.items()
            )
            cut = TripletCut(pl_module, prefix)
            try:
                seconds = {
                    p.name: cost.round_seconds(
                        model, batch, run.mean_local_batches(), held, p, cached=cache is not None
                    )
                    for p in cost.fleet_profiles()
                }
                memory = cost.memory_bytes(model, batch)
            finally:
                cut.restore()
            answers.append({"seconds": seconds, "memory_bytes": memory})
        return answers

    def adopt_state(self, pl_module: pl.LightningModule, state: TrainableState) -> None:
        # A user's own module: its SVD layers take the state's rank per module, and the modules the state
        # no longer has are pruned (FedPEFTModule does this in its set_trainable_state).
        adopt_state_ranks(pl_module, state)

    # -- the client half: importance over local steps ------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        self._scoring = bool(ctx.instructions.get("importance", False))
        self._allocator.reset_ipt()
        keep = ctx.instructions.get("triplets")
        self._keep = None
        if keep is not None:  # a fleet's client: only its prefix of the active triplets trains
            self._keep = {m: [int(i) for i in ix] for m, ix in keep.items()}
            self._cut = TripletCut(pl_module, self._keep)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._scoring:
            self._allocator.update_ipt(getattr(pl_module, "model", pl_module))

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        tensors = triplet_importance(pl_module, self._allocator) if self._scoring else {}
        metrics: dict[str, float] = {}
        if self._cut is not None:
            # Back to the global shapes (the untrained triplets as received); importance goes with them, 0
            # where this client trained nothing (the server averages each triplet over those that did).
            self._cut.restore()
            self._cut = None
            ranks = state_ranks(ctx.global_state)
            for m, n in ranks.items():
                key = m + IMPORTANCE
                if key in tensors:
                    full = torch.zeros(n, dtype=tensors[key].dtype)
                    full[self._keep.get(m, [])] = tensors[key]
                    tensors[key] = full
            metrics["client_triplets"] = float(sum(len(ix) for ix in (self._keep or {}).values()))
        return ClientResult(tensors=tensors, metrics=metrics)


class SensitivityAverages:
    """AdaLoRA's per-element sensitivity and uncertainty averages over a client's local steps.

    The arithmetic of peft's ``RankAllocator.update_ipt`` (``I = |θ ∂L/∂θ|``; ``Ī ← β1 Ī + (1 − β1) I``;
    ``Ū ← β2 Ū + (1 − β2) |I − Ī|``), in the same order of operations, over every factor at once with
    torch's ``_foreach`` kernels: peft's loop launches about seven kernels per factor per step, which on a
    GPU cost as much as a LoRA step's own work. peft's budget and masking are not used (the server allocates).
    """

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def reset_ipt(self) -> None:
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}

    def update_ipt(self, model: torch.nn.Module) -> None:
        # Factors frozen at rank 0 (a fleet client's modules outside its prefix) have no gradient to score.
        named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and ADAPTER in n and p.requires_grad]
        for name, param in named:
            if name not in self.exp_avg_ipt:
                self.exp_avg_ipt[name] = torch.zeros_like(param)
                self.exp_avg_unc[name] = torch.zeros_like(param)
        params = [p.detach() for _, p in named]
        grads = [_full_grad(p) for _, p in named]
        avg_ipt = [self.exp_avg_ipt[n] for n, _ in named]
        avg_unc = [self.exp_avg_unc[n] for n, _ in named]
        with torch.no_grad():
            ipt = torch._foreach_mul(params, grads)
            torch._foreach_abs_(ipt)
            torch._foreach_mul_(avg_ipt, self.beta1)
            torch._foreach_add_(avg_ipt, torch._foreach_mul(ipt, 1 - self.beta1))
            spread = torch._foreach_sub(ipt, avg_ipt)
            torch._foreach_abs_(spread)
            torch._foreach_mul_(avg_unc, self.beta2)
            torch._foreach_add_(avg_unc, torch._foreach_mul(spread, 1 - self.beta2))


def _holds_adalora(pl_module: torch.nn.Module) -> bool:
    """Whether a peft model with an AdaLoRA config sits anywhere in ``pl_module``."""
    from peft import AdaLoraConfig

    for module in pl_module.modules():
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict) and isinstance(config.get(ADAPTER), AdaLoraConfig):
            return True
    return False


def _full_grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is not None:
        return param.grad.detach()
    import deepspeed  # under ZeRO the gradient lives in the optimizer's partitions

    return deepspeed.utils.safe_get_full_grad(param)


def triplet_importance(pl_module: torch.nn.Module, allocator: Any) -> dict[str, torch.Tensor]:
    """One importance value per active triplet of every live SVD layer, keyed ``<module>.importance``.

    AdaLoRA's triplet score: ``s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ī · Ū`` the
    smoothed sensitivity times its uncertainty (zeros if the client took no step). Module names are
    those of the trainable state (qualified from ``pl_module``).
    """
    model = getattr(pl_module, "model", pl_module)
    prefix = "model." if model is not pl_module else ""
    out: dict[str, torch.Tensor] = {}
    for name, layer in svd_layers(model).items():
        e_key, a_key, b_key = triplet_keys(name)  # the allocator's keys: names within `model`

        def score(key: str, param: torch.Tensor) -> torch.Tensor:
            if key not in allocator.exp_avg_ipt:
                return torch.zeros_like(param)
            return allocator.exp_avg_ipt[key] * allocator.exp_avg_unc[key]

        r = layer_rank(layer)
        s_e = score(e_key, layer.lora_E["default"]).reshape(r)
        s_a = score(a_key, layer.lora_A["default"]).mean(dim=1) if r else torch.zeros(0)
        s_b = score(b_key, layer.lora_B["default"]).mean(dim=0) if r else torch.zeros(0)
        out[prefix + name + IMPORTANCE] = (s_e + s_a + s_b).detach().float().cpu()
    return out


class ModulePruning(ClientResources):
    """FedARA's rank-based module pruning: modules left with no active triplet leave the model.

    Needs :class:`RankAllocation`, whose server half then drops such a module from the global state; every
    client that receives it puts the frozen base layer back in the module's place
    (:func:`~lightning_fedpeft.tuners.svd.prune_layer`): the module no longer runs, its parameters leave the
    optimizer and the wire, and autograd stops below the lowest layer that still has a trainable module.
    What that buys is logged per round (as :class:`~lightning_fedpeft.callbacks.ClientResources` does:
    ``step_time_ms``, ``peak_rss_mb``, ``saved_activation_mb``) beside RankAllocation's ``active_ranks``,
    ``live_modules`` and ``lowest_live_layer``.
    """

    requires = (RankAllocation,)
