"""FedAdapter's client half: the progressive upgrade as a Lightning callback.

:class:`ProgressiveUpgrade` builds the server half (:class:`~lightning_fedpeft.fedadapter.strategy.TrialGroupStrategy`),
answers its queries on the server's process (a state's validation accuracy, a state grown to a
configuration, a configuration's per-round cost: what only a process with the model can work out), and
on every client checks that the state it received is the configuration its group was told to train,
dropping activation-cache entries that the decided depth made stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm, FederatedRun
from lightning_fedpeft.cost import check_memory
from lightning_fedpeft.fedadapter.strategy import (
    CANDIDATES,
    Config,
    Decision,
    DepthCosts,
    EvaluateState,
    GrowState,
    RoundCost,
    TrialGroupStrategy,
)
from lightning_fedpeft.seeds import derived_seed
from lightning_fedpeft.state import state_nbytes, trainable_state
from lightning_fedpeft.strategy import Query


class ProgressiveUpgrade(FederatedAlgorithm):
    """FedAdapter's progressive upgrade of adapter depth and width, on top of :class:`~lightning_fedpeft.RoundSync`.

    Needs ``model.method='adapter'`` and ``federation.cost_model`` (the trial budget is simulated time).
    Each Lightning epoch is one round of one trial group of ``federation.clients_per_round`` clients, so
    ``trainer.max_epochs`` counts the rounds of every group. The decisions go to ``decisions.csv`` beside
    the logger's files; the server's state rides in RoundSync's checkpoint state.

    Args:
        start_depth / start_width: the starting configuration (paper: depth 0, width 8).
        depth_step: how many layers the deeper candidate adds (paper: 1, or 4 for harder tasks).
        width_step / max_width: the wider candidate's step and the largest width (paper: 8 and 64).
        clients_per_group: participants per group and round (paper: 5, three groups: 15 per round). One
            group trains per round, so this is ``federation.clients_per_round``: leave it unset, or equal.
        candidates: which of ``shallow``, ``deeper``, ``wider`` each window tries.
        window_s: ``T0``, in simulated seconds (paper: 60-100 s for BERT-base on a TX2). If unset,
            ``window_rounds`` rounds of the starting configuration.
        window_rounds: sets ``T0`` when ``window_s`` is unset, in rounds of the start configuration (4: the
            paper's T0 over its uncached depth-0 round; docs/fedadapter.md gives the other readings).
        max_val_batches: validation batches used to score candidates (``None``: the whole split).
        fleet_budgets: on a fleet (``federation.cost_model.fleet``), every client trains the top adapters of
            the trial's depth that fit its device and the round's time budget (``fleet.round_budget_s``), and
            trial groups are drawn within device classes; ``False``: every client trains the whole trial
            configuration (groups still drawn within device classes).
    """

    def __init__(
        self,
        start_depth: int = 0,
        start_width: int = 8,
        depth_step: int = 1,
        width_step: int = 8,
        max_width: int = 64,
        clients_per_group: int | None = None,
        candidates: list[str] | None = None,
        window_s: float | None = None,
        window_rounds: float = 4.0,
        max_val_batches: int | None = None,
        fleet_budgets: bool = True,
    ) -> None:
        super().__init__()
        candidates = list(candidates or CANDIDATES)
        bad = [c for c in candidates if c not in CANDIDATES]
        if bad or not candidates:
            raise ValueError(f"upgrade.candidates={candidates} must be a non-empty subset of {list(CANDIDATES)}")
        for name, value in (("depth_step", depth_step), ("width_step", width_step)):
            if value < 1:
                raise ValueError(f"upgrade.{name}={value} must be at least 1")
        if clients_per_group is not None and clients_per_group < 1:
            raise ValueError(f"upgrade.clients_per_group={clients_per_group} must be at least 1 (or unset)")
        if start_depth < 0 or start_width < 1 or start_width > max_width:
            raise ValueError(
                f"upgrade.start_depth={start_depth} must be >= 0 and upgrade.start_width={start_width} "
                f"within 1..max_width={max_width}"
            )
        if window_s is not None and not window_s > 0:
            raise ValueError(f"upgrade.window_s={window_s} must be a positive number of simulated seconds")
        if not window_rounds > 0:
            raise ValueError(f"upgrade.window_rounds={window_rounds} must be positive")
        self.start: Config = (start_depth, start_width)
        self.depth_step, self.width_step, self.max_width = depth_step, width_step, max_width
        self.clients_per_group = clients_per_group
        self.candidates = candidates
        self.window_s = window_s
        self.window_rounds = window_rounds
        self.max_val_batches = max_val_batches
        self.fleet_budgets = fleet_budgets
        self.strategy: TrialGroupStrategy | None = None
        self._frozen: list[torch.nn.Parameter] = []  # a fleet client's adapters below its train depth
        self._run: FederatedRun | None = None
        self._decided_depth: int | None = None  # the decided depth this process's cache was last pruned for

    def configure(self, run: FederatedRun) -> TrialGroupStrategy:
        pl_module = run.pl_module
        if getattr(pl_module, "adapter_injection", None) is None:
            raise ValueError("ProgressiveUpgrade needs model.method='adapter' (it grows bottleneck adapters)")
        if run.cost_model is None:
            raise ValueError(
                "ProgressiveUpgrade needs federation.cost_model (trial groups share a simulated time budget); "
                "e.g. federation.cost_model: {device: tx2, bandwidth_mbps: 1.0}"
            )
        if self.clients_per_group is not None and self.clients_per_group != run.clients_per_round:
            raise ValueError(
                f"upgrade.clients_per_group={self.clients_per_group} differs from federation.clients_per_round="
                f"{run.clients_per_round}: one trial group trains per round, so they are the same number; set "
                f"federation.clients_per_round={self.clients_per_group} and leave clients_per_group unset"
            )
        num_layers = len(pl_module.adapter_injection.layers)
        if self.start[0] > num_layers:
            raise ValueError(f"upgrade.start_depth={self.start[0]} exceeds the model's {num_layers} layers")
        # The run starts from the starting configuration (a resumed run then loads the checkpoint's).
        if pl_module.adapter_config != self.start:
            pl_module.resize_adapters(*self.start)
        self._run = run
        cost = run.cost_model
        on_fleet = bool(cost.client_devices)
        self.sizes_per_client = on_fleet and self.fleet_budgets
        if self.sizes_per_client:  # the smallest configuration a client may get must fit every device
            batch = {k: v.to(pl_module.device) for k, v in run.sample_batch().items()}
            smallest = min(self.start[0], 1)
            with _train_depth(pl_module, smallest):
                check_memory(cost, pl_module.model, batch, f"adapters trained at depth {smallest}")
        self.strategy = TrialGroupStrategy(
            clients_per_group=run.clients_per_round,
            num_layers=num_layers,
            start=self.start,
            window_s=self.window_s,
            window_rounds=self.window_rounds,
            depth_step=self.depth_step,
            width_step=self.width_step,
            max_width=self.max_width,
            candidates=self.candidates,
            seed=run.seed,
            client_devices=cost.client_devices if on_fleet else None,
            device_memory_gb={p.name: p.memory_gb for p in cost.fleet_profiles()} if on_fleet else None,
            round_budget_s=cost.fleet.round_budget_s if on_fleet and cost.fleet is not None else None,
            per_client_depth=self.fleet_budgets,
        )

        return self.strategy

    @property
    def decisions(self) -> list[Decision]:
        return [] if self.strategy is None else list(self.strategy.decisions)

    # -- the client half ------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        told = (ctx.instructions.get("adapter_depth"), ctx.instructions.get("adapter_width"))
        depth, width = pl_module.adapter_config
        if told[0] is None:
            raise RuntimeError(
                f"round {ctx.round}: client {ctx.client_id} was told no adapter configuration to train; "
                f"is the server running ProgressiveUpgrade too?"
            )
        if told[0] != depth or (depth > 0 and told[1] != width):  # depth 0 has no adapter to have a width
            raise RuntimeError(
                f"round {ctx.round}: client {ctx.client_id} was told to train adapters (depth, width) = {told} "
                f"but the state it received has ({depth}, {width})"
            )
        decided = int(ctx.instructions.get("decided_depth", depth))
        cache = getattr(pl_module, "activation_cache", None)
        if cache is not None and decided != self._decided_depth:
            # Depth only grows from a decision on: entries cached for a higher boundary will not be used again.
            cache.invalidate_above(len(pl_module.adapter_injection.layers) - decided)
            self._decided_depth = decided
        train_depth = ctx.instructions.get("train_depth")
        if train_depth is not None and int(train_depth) < depth:  # a fleet client trains only its top adapters
            self._frozen = _freeze_below(pl_module, int(train_depth))
            if cache is not None:  # the adapters it froze change every round: no cached rows above them
                cache.stable_boundary = len(pl_module.adapter_injection.layers) - depth

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        # The adapters below the train depth were frozen for the local steps only: they travel (unchanged).
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []
        cache = getattr(pl_module, "activation_cache", None)
        if cache is not None:
            cache.stable_boundary = None
        told = ctx.instructions.get("train_depth")
        return ClientResult(metrics={"train_depth": float(told)}) if told is not None else ClientResult()

    # -- the server's questions, answered with the model on its process ---------------------------------------
    def answer_query(self, query: Query, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if isinstance(query, EvaluateState):
            return self._evaluate(query.state, trainer, pl_module)
        if isinstance(query, GrowState):
            return self._grow(query.state, query.config, pl_module)
        if isinstance(query, RoundCost):
            return self._round_cost(query.config, pl_module)
        if isinstance(query, DepthCosts):
            return self._depth_costs(query.config, pl_module)
        return super().answer_query(query, trainer, pl_module)

    def _grow(self, state: dict[str, torch.Tensor], config: Config, module: Any) -> dict[str, torch.Tensor]:
        """``state`` grown (function-preserving) to ``config``; the module ends in that configuration."""
        assert self._run is not None
        module.set_trainable_state(state)
        gen = torch.Generator().manual_seed(derived_seed(self._run.seed, *config, scales=(7919, 131, 1)))
        module.resize_adapters(*config, generator=gen)
        return trainable_state(module)

    def _evaluate(self, state: dict[str, torch.Tensor], trainer: pl.Trainer, module: Any) -> float:
        return validation_accuracy(state, trainer, module, self.max_val_batches)

    def _depth_costs(self, config: Config, module: Any) -> list[dict[str, Any]]:
        """On a fleet: per train depth of ``config`` (its depth down to 1; 0 at depth 0), the predicted round
        seconds on every device profile and the counted memory."""
        run = self._run
        assert run is not None and run.cost_model is not None
        cost = run.cost_model
        saved = trainable_state(module)
        module.resize_adapters(*config, generator=torch.Generator().manual_seed(0))
        try:
            batch = {k: v.to(module.device) for k, v in run.sample_batch().items()}
            cached = getattr(module, "activation_cache", None) is not None
            total = state_nbytes(trainable_state(module))
            # A client below the configuration's depth runs the adapters it froze forward: the cache serves
            # only from the configuration's boundary (ActivationCache.stable_boundary).
            cap = len(module.adapter_injection.layers) - config[0]
            depths = range(config[0], 0, -1) if config[0] > 0 else [0]
            local = run.mean_local_batches()
            return cost.train_depth_costs(
                module.model, batch, local, total, depths, lambda d: _train_depth(module, d), cached, cap
            )
        finally:
            module.set_trainable_state(saved)

    def _round_cost(self, config: Config, module: Any) -> float:
        """Predicted simulated seconds of one client round in ``config``: local steps + download + upload."""
        run = self._run
        assert run is not None and run.cost_model is not None
        saved = trainable_state(module)
        gen = torch.Generator().manual_seed(0)
        module.resize_adapters(*config, generator=gen)
        try:
            batch = {k: v.to(module.device) for k, v in run.sample_batch().items()}
            cache = getattr(module, "activation_cache", None)
            step, _ = run.cost_model.step_flops(module.model, batch, cached=cache is not None)
            seconds = run.cost_model.device.batch_seconds(step) * run.mean_local_batches()
            seconds += 2 * run.cost_model.comm_seconds(state_nbytes(trainable_state(module)))
        finally:
            module.set_trainable_state(saved)
        return seconds


def _freeze_below(pl_module: Any, depth: int) -> list[torch.nn.Parameter]:
    """Freeze the adapters below the top ``depth`` ones; return the parameters frozen."""
    adapters = pl_module.adapter_injection.adapters  # by transformer-layer index
    lowest_kept = sorted(adapters)[len(adapters) - depth :] if depth > 0 else []
    frozen = []
    for idx, adapter in adapters.items():
        if idx in lowest_kept:
            continue
        for param in adapter.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen.append(param)
    return frozen


@contextlib.contextmanager
def _train_depth(pl_module: Any, depth: int) -> Iterator[list[torch.nn.Parameter]]:
    """Within: only the top ``depth`` adapters train (the others frozen); afterwards all train again."""
    frozen = _freeze_below(pl_module, depth)
    try:
        yield frozen
    finally:
        for param in frozen:
            param.requires_grad_(True)


def validation_accuracy(
    state: dict[str, torch.Tensor], trainer: pl.Trainer, module: Any, max_batches: int | None
) -> float:
    """Accuracy of ``state`` on the validation split (the activation cache is used if there is one).

    Hand-written: Lightning's validation loop cannot run inside ``fit`` on a state other than the
    global model it is about to validate, and candidates are scored between rounds.
    """
    module.set_trainable_state(state)
    loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else module.val_dataloader()
    cache = getattr(module, "activation_cache", None)
    was_training = module.training
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(module.device) for k, v in batch.items()}
            out = cache(module.model, batch) if cache is not None else module.model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
    module.train(was_training)
    if total == 0:
        raise ValueError("ProgressiveUpgrade scores candidates on the validation split, which is empty")
    return correct / total
