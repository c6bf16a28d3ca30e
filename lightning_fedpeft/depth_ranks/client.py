"""FedAdapter x FedARA, the client half: :class:`DepthRankUpgrade`, a Lightning callback.

It builds the server half (:class:`~.strategy.DepthRankStrategy`), starts the model at ``start_depth`` live
layers (the SVD modules below go to rank 0), answers the server's questions on its process (a state's
validation accuracy, a state's round cost) and, on every client, freezes the modules with no triplet (so
backward stops above the lowest live layer) and scores the live triplets as FedARA's clients do. A fleet's
client also freezes the live modules below its top ``train_depth`` layers, if the server told it one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm, FederatedRun, load_state
from lightning_fedpeft.cost import check_memory, priced_model
from lightning_fedpeft.depth_ranks.strategy import DepthRankStrategy, StateCost, StateDepthCosts
from lightning_fedpeft.fedadapter.client import validation_accuracy
from lightning_fedpeft.fedadapter.strategy import EvaluateState
from lightning_fedpeft.fedara.client import SensitivityAverages, triplet_importance
from lightning_fedpeft.state import layer_of, state_nbytes, trainable_state
from lightning_fedpeft.strategy import Query
from lightning_fedpeft.tuners.svd import ADAPTER, TripletCut, adopt_state_ranks, layer_rank, set_rank, svd_layers


class DepthRankUpgrade(FederatedAlgorithm):
    """FedAdapter's progressive depth over FedARA's allocated ranks, in one algorithm (see :mod:`.strategy`).

    Needs SVD layers (``model.method='svd'``, or a module holding a peft AdaLoRA model) with one ``r_init``,
    and ``federation.cost_model`` (trial groups share a simulated time budget). ``decisions.csv`` gets every
    window's trials and winner; ``rounds.csv`` the live modules, active ranks and rank per module.

    Args:
        start_depth: live layers at the start (the modules below are dormant at rank 0).
        depth_step: how many layers the deeper candidate wakes.
        target_rank: average triplets per live module at the end of the fall.
        warmup_windows / decay_windows: windows before the fall, and its length in windows.
        importance_beta: the server's smoothing of the importance over windows.
        window_s / window_rounds: the trial budget ``T0`` (as :class:`~lightning_fedpeft.ProgressiveUpgrade`).
        max_val_batches: validation batches that score a trial (``None``: the whole split).
        beta1 / beta2: AdaLoRA's smoothing of sensitivity and uncertainty over local steps.
        fleet_budgets: on a fleet (``federation.cost_model.fleet``), every client trains the live modules of the
            top layers that fit its device and the round's time budget (``fleet.round_budget_s``), and each
            module is averaged over the clients that trained it. ``False``: every client trains the trial's
            whole depth, and the slowest device sets a round's pace.
    """

    def __init__(
        self,
        start_depth: int = 1,
        depth_step: int = 1,
        target_rank: float = 1.0,
        warmup_windows: int = 1,
        decay_windows: int = 3,
        importance_beta: float = 0.5,
        window_s: float | None = None,
        window_rounds: float = 4.0,
        max_val_batches: int | None = None,
        beta1: float = 0.85,
        beta2: float = 0.85,
        fleet_budgets: bool = True,
    ) -> None:
        super().__init__()
        if start_depth < 1 or depth_step < 1:
            raise ValueError(f"depth_ranks.start_depth={start_depth} and depth_step={depth_step} must be >= 1")
        if window_s is not None and not window_s > 0:
            raise ValueError(f"depth_ranks.window_s={window_s} must be a positive number of simulated seconds")
        self.start_depth, self.depth_step = start_depth, depth_step
        self.target_rank = target_rank
        self.warmup_windows, self.decay_windows = warmup_windows, decay_windows
        self.importance_beta = importance_beta
        self.window_s, self.window_rounds = window_s, window_rounds
        self.max_val_batches = max_val_batches
        self.fleet_budgets = fleet_budgets
        self._averages = SensitivityAverages(beta1, beta2)
        self.strategy: DepthRankStrategy | None = None
        self._run: FederatedRun | None = None
        self._cut: TripletCut | None = None
        self._frozen: list[torch.nn.Parameter] = []  # a fleet client's live modules below its train depth
        self._num_layers = 0

    @property
    def decisions(self) -> list[Any]:
        return [] if self.strategy is None else list(self.strategy.decisions)

    def configure(self, run: FederatedRun) -> DepthRankStrategy:
        pl_module = run.pl_module
        model = getattr(pl_module, "model", pl_module)
        layers = svd_layers(pl_module)
        if not layers:
            raise ValueError("DepthRankUpgrade needs SVD layers: set model.method='svd' (peft's AdaLoRA layers)")
        if run.cost_model is None:
            raise ValueError(
                "DepthRankUpgrade needs federation.cost_model (trial groups share a simulated time budget); "
                "e.g. federation.cost_model: {device: tx2, bandwidth_mbps: 1.0}"
            )
        num_layers = int(getattr(model.config, "num_hidden_layers", 0))
        if not 1 <= self.start_depth <= num_layers:
            raise ValueError(f"depth_ranks.start_depth={self.start_depth} must be within 1..{num_layers} layers")
        self._run = run
        self._num_layers = num_layers
        cost = run.cost_model
        on_fleet = bool(cost.client_devices)
        initial = {k: v.cpu() for k, v in trainable_state(pl_module).items()}
        self.strategy = DepthRankStrategy(
            run.clients_per_round,
            initial,
            num_layers,
            self.start_depth,
            target_rank=self.target_rank,
            warmup_windows=self.warmup_windows,
            decay_windows=self.decay_windows,
            importance_beta=self.importance_beta,
            window_s=self.window_s,
            window_rounds=self.window_rounds,
            depth_step=self.depth_step,
            seed=run.seed,
            client_devices=cost.client_devices if on_fleet else None,
            device_memory_gb={p.name: p.memory_gb for p in cost.fleet_profiles()} if on_fleet else None,
            round_budget_s=cost.fleet.round_budget_s if on_fleet and cost.fleet is not None else None,
            per_client_depth=self.fleet_budgets,
        )
        # The run starts at start_depth: the modules below go dormant (a resumed run loads its own state next).
        for name, layer in layers.items():
            if not self.strategy.live(name, self.start_depth):
                set_rank(layer, 0)
        # The least a client may be handed (the top layer's modules, or the start depth's without per-client
        # depths) must fit every device of the run: refused here, before any training.
        smallest = 1 if on_fleet and self.fleet_budgets else self.start_depth
        batch = {k: v.to(pl_module.device) for k, v in run.sample_batch().items()}
        cut = _freeze_empty(pl_module)
        try:
            with self._train_depth(pl_module, smallest):
                check_memory(cost, model, batch, f"SVD adapters trained in the top {smallest} layer(s)")
        finally:
            cut.restore()
        return self.strategy

    def adopt_state(self, pl_module: pl.LightningModule, state: dict[str, torch.Tensor]) -> None:
        adopt_state_ranks(pl_module, state)

    # -- the server's questions -------------------------------------------------------------------------------
    def answer_query(self, query: Query, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if isinstance(query, EvaluateState):
            return validation_accuracy(query.state, trainer, pl_module, self.max_val_batches)
        if isinstance(query, StateCost):
            return self._round_cost(query.state, pl_module)
        if isinstance(query, StateDepthCosts):
            return self._depth_costs(query.state, query.config[0], pl_module)
        return super().answer_query(query, trainer, pl_module)

    def _round_cost(self, state: dict[str, torch.Tensor], pl_module: Any) -> float:
        """Predicted simulated seconds of a client round training ``state``, on the run's slowest device."""
        run = self._run
        assert run is not None and run.cost_model is not None
        cost = run.cost_model
        load_state(pl_module, state, [self])
        cut = _freeze_empty(pl_module)
        try:
            batch = {k: v.to(pl_module.device) for k, v in run.sample_batch().items()}
            cached = getattr(pl_module, "activation_cache", None) is not None
            model = priced_model(pl_module)
            local = run.mean_local_batches()
            nbytes = state_nbytes(state)
            return max(cost.round_seconds(model, batch, local, nbytes, p, cached) for p in cost.fleet_profiles())
        finally:
            cut.restore()

    def _depth_costs(self, state: dict[str, torch.Tensor], depth: int, pl_module: Any) -> list[dict[str, Any]]:
        """On a fleet: per train depth of ``state`` (``depth`` down to 1), the predicted round seconds on every
        device profile and the counted memory (as :class:`~lightning_fedpeft.fedadapter.strategy.DepthCosts`)."""
        run = self._run
        assert run is not None and run.cost_model is not None
        cost = run.cost_model
        load_state(pl_module, state, [self])
        cut = _freeze_empty(pl_module)
        try:
            batch = {k: v.to(pl_module.device) for k, v in run.sample_batch().items()}
            cached = getattr(pl_module, "activation_cache", None) is not None
            cap = self._num_layers - depth  # the cache serves no row above a live layer (on_client_start)
            return cost.train_depth_costs(
                priced_model(pl_module),
                batch,
                run.mean_local_batches(),
                state_nbytes(state),
                range(depth, 0, -1),
                lambda d: self._train_depth(pl_module, d),
                cached,
                cap,
            )
        finally:
            cut.restore()

    @contextlib.contextmanager
    def _train_depth(self, pl_module: Any, depth: int) -> Iterator[list[torch.nn.Parameter]]:
        """Within: only the live modules of the top ``depth`` layers train; afterwards as before."""
        frozen = self._freeze_below(pl_module, depth)
        try:
            yield frozen
        finally:
            _unfreeze(frozen)

    def _freeze_below(self, pl_module: Any, depth: int) -> list[torch.nn.Parameter]:
        """Freeze the trainable SVD factors outside the top ``depth`` layers; return the parameters frozen."""
        lowest = self._num_layers - depth
        frozen = []
        for name, layer in svd_layers(pl_module).items():
            index = layer_of(name + ".")
            if index is None or index >= lowest:
                continue
            for factor in (layer.lora_E, layer.lora_A, layer.lora_B):
                param = factor[ADAPTER]
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(param)
        return frozen

    # -- the client half ---------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        self._averages.reset_ipt()
        self._cut = _freeze_empty(pl_module)
        train_depth = ctx.instructions.get("train_depth")
        if train_depth is not None:  # a fleet client trains only its top layers' modules
            self._frozen = self._freeze_below(pl_module, int(train_depth))
            cache = getattr(pl_module, "activation_cache", None)
            if cache is not None:  # the live modules it froze change every round: no cached rows above them
                cache.stable_boundary = self._num_layers - int(ctx.instructions["adapter_depth"])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._averages.update_ipt(getattr(pl_module, "model", pl_module))

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        tensors = triplet_importance(pl_module, self._averages)
        _unfreeze(self._frozen)  # frozen for the local steps only: they travel back unchanged
        self._frozen = []
        cache = getattr(pl_module, "activation_cache", None)
        if cache is not None:
            cache.stable_boundary = None
        if self._cut is not None:
            self._cut.restore()
            self._cut = None
        told = ctx.instructions.get("train_depth")
        metrics = {"train_depth": float(told)} if told is not None else {}
        return ClientResult(tensors=tensors, metrics=metrics)


def _unfreeze(params: list[torch.nn.Parameter]) -> None:
    for param in params:
        param.requires_grad_(True)


def _freeze_empty(pl_module: Any) -> TripletCut:
    """Freeze every SVD layer that holds no triplet (dormant, or emptied by the mask); the rest untouched."""
    keep = {name: list(range(layer_rank(layer))) for name, layer in svd_layers(pl_module).items()}
    return TripletCut(pl_module, keep)
