"""FedAdapter: progressive upgrade of adapter depth and width, decided by trial groups.

Server half, :class:`TrialGroupStrategy`: every decision window it trains candidate configurations from
the same global model: the current one ``(d, w)``, a deeper one ``(d + depth_step, w)`` and a wider one
``(d, w + width_step)``, each by its own group of participants. Every group gets the same *simulated*
time budget ``W = T0 * (4 d + 1)``, so a cheaper configuration runs more rounds (``floor(W / c_k)`` for a
per-round cost ``c_k``). At the end of the window each candidate is scored on the validation split, the
one with the highest accuracy (= the most accuracy gained in the same time) wins, and everyone continues
from the winner's model. The clock advances by the winner's simulated time: the groups run side by side
on real devices. Here they run one after the other (each Lightning epoch is one round of one group).

Client half, :class:`ProgressiveUpgrade` (a Lightning callback): builds the strategy, gives it what only a
process with the model can do (grow a state to a configuration, score a state on the validation split,
predict a configuration's per-round cost) and drops stale activation-cache entries when the depth grows.
Clients need no instruction to train a candidate: the adapter configuration is read off the global
state's tensor names and shapes (:meth:`FedPEFTModule.set_trainable_state`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_fedpeft.callbacks.log_table import write_log_table
from lightning_fedpeft.cost import round_seconds
from lightning_fedpeft.state import TrainableState, state_nbytes, trainable_state
from lightning_fedpeft.strategy import ClientUpdate, FedAvg, RoundPlan, Strategy

log = logging.getLogger(__name__)

Config = tuple[int, int]  # (depth, width)
CANDIDATES: tuple[str, ...] = ("shallow", "deeper", "wider")


@dataclass
class Trial:
    """One candidate of a decision window and what came of it."""

    name: str
    depth: int
    width: int
    cost_s: float  # predicted simulated seconds per round
    rounds: int  # rounds it gets within the window's budget
    done: int = 0
    elapsed_s: float = 0.0  # simulated seconds its rounds actually took
    val_acc: float | None = None


@dataclass
class Decision:
    """The outcome of one decision window (a row of the decision table)."""

    window: int
    start_depth: int
    start_width: int
    budget_s: float
    start_acc: float
    trials: str  # "name(d,w): rounds -> acc" for every candidate
    winner: str
    depth: int
    width: int
    val_acc: float
    gain: float
    sim_time_h: float  # the clock after the window


class TrialGroupStrategy(Strategy):
    """The server half of FedAdapter (see the module docstring).

    Args:
        clients_per_group: participants per trial group and round.
        num_layers: transformer layers of the model (the deepest possible configuration).
        start: the starting ``(depth, width)``.
        depth_step / width_step / max_width: how candidates grow.
        candidates: which of ``shallow``, ``deeper``, ``wider`` are tried each window.
        window_s: ``T0`` in simulated seconds; the window budget is ``T0 * (4 d + 1)``.
        grow_fn / evaluate_fn / cost_fn: provided by the client half: a state grown to a configuration,
            a state's validation accuracy, a configuration's predicted seconds per round.
        seed: seeds the sampling of groups.
    """

    def __init__(
        self,
        clients_per_group: int,
        num_layers: int,
        start: Config,
        window_s: float,
        grow_fn: Callable[[TrainableState, Config], TrainableState],
        evaluate_fn: Callable[[TrainableState], float],
        cost_fn: Callable[[Config], float],
        depth_step: int = 1,
        width_step: int = 8,
        max_width: int = 64,
        candidates: Sequence[str] = CANDIDATES,
        seed: int = 0,
    ) -> None:
        super().__init__(clients_per_group, seed=seed)
        self.num_layers = num_layers
        self.config: Config = tuple(start)  # type: ignore[assignment]
        self.window_s = window_s
        self.grow_fn, self.evaluate_fn, self.cost_fn = grow_fn, evaluate_fn, cost_fn
        self.depth_step, self.width_step, self.max_width = depth_step, width_step, max_width
        self.candidates = tuple(candidates)
        self._fedavg = FedAvg(clients_per_group, seed=seed)
        self.window = 0
        self.trials: list[Trial] = []
        self.phase = 0
        self.clock_s = 0.0
        self.start_acc: float | None = None
        self.window_start_state: TrainableState | None = None
        self.results: dict[int, TrainableState] = {}
        self.decisions: list[Decision] = []
        self._extras: dict[str, float] = {}

    @property
    def groups(self) -> int:
        return len(self.candidates)

    # -- configure: which group trains this round ---------------------------------------------------------
    def plan_window(self) -> list[Trial]:
        """The candidates of the next window and their round counts under the shared time budget."""
        d, w = self.config
        configs: list[tuple[str, Config]] = []
        for name in self.candidates:
            cfg = {"shallow": (d, w), "deeper": (d + self.depth_step, w), "wider": (d, w + self.width_step)}[name]
            if name == "wider" and d == 0:
                continue  # no adapter at depth 0: a wider one would be the same model
            if cfg[0] <= self.num_layers and cfg[1] <= self.max_width and cfg not in [c for _, c in configs]:
                configs.append((name, cfg))
        budget = self.budget_s()
        trials = []
        for name, cfg in configs:
            cost = self.cost_fn(cfg)
            trials.append(Trial(name, cfg[0], cfg[1], cost, max(1, math.floor(budget / cost))))
        return trials

    def budget_s(self) -> float:
        """The window's simulated time budget per group: ``T0 * (4 d + 1)``."""
        return self.window_s * (4 * self.config[0] + 1)

    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        need = self.groups * self.clients_per_round
        if need > num_clients:
            raise ValueError(
                f"FedAdapter trial groups need {self.groups} x {self.clients_per_round} = {need} distinct clients per "
                f"round but there are {num_clients}; lower upgrade.clients_per_group or use fewer candidates"
            )
        if not self.trials:
            raise RuntimeError("TrialGroupStrategy.start_window must be called before the first round")
        trial = self.trials[self.phase]
        # The groups of one window run side by side on real devices: round j of every group draws from
        # the same sample of groups x clients_per_group clients, group k taking the k-th slice.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.window * 10_007 + trial.done)
        chosen = torch.randperm(num_clients, generator=gen)[:need].tolist()
        k = self.phase
        return RoundPlan(
            round=round_idx, client_ids=sorted(chosen[k * self.clients_per_round : (k + 1) * self.clients_per_round])
        )

    def start_window(self, state: TrainableState) -> None:
        """Open a decision window from the global ``state`` (of the current configuration)."""
        self.trials = self.plan_window()
        self.phase = 0
        self.results = {}
        self.window_start_state = {k: v.clone() for k, v in state.items()}
        if self.start_acc is None:
            self.start_acc = self.evaluate_fn(self.window_start_state)
        log.info(
            "FedAdapter window %d from (d=%d, w=%d), budget %.1fs: %s",
            self.window,
            *self.config,
            self.budget_s(),
            ", ".join(f"{t.name}({t.depth},{t.width}) x{t.rounds}" for t in self.trials),
        )

    # -- aggregate: average, and at the end of a phase move on to the next group or decide ---------------
    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        trial = self.trials[self.phase]
        new_state = self._fedavg.aggregate(round_idx, global_state, updates)
        measured = round_seconds([u.metrics for u in updates])
        trial.elapsed_s += measured if measured > 0 else trial.cost_s
        trial.done += 1
        self._extras = {
            "window": float(self.window),
            "trial_depth": float(trial.depth),
            "trial_width": float(trial.width),
            "sim_time_s": self.clock_s + trial.elapsed_s,
        }
        if trial.done < trial.rounds:
            return new_state
        trial.val_acc = self.evaluate_fn(new_state)
        self.results[self.phase] = new_state
        self.phase += 1
        if self.phase < len(self.trials):
            nxt = self.trials[self.phase]
            assert self.window_start_state is not None
            return self.grow_fn(self.window_start_state, (nxt.depth, nxt.width))
        return self._decide()

    def _decide(self) -> TrainableState:
        # Highest validation accuracy wins; on a tie the earlier (cheaper: shallow first) candidate.
        best = max(range(len(self.trials)), key=lambda k: (self.trials[k].val_acc, -k))
        winner = self.trials[best]
        start_acc = float(self.start_acc if self.start_acc is not None else float("nan"))
        start_cfg = self.config
        budget = self.budget_s()
        self.clock_s += winner.elapsed_s
        self.config = (winner.depth, winner.width)
        decision = Decision(
            window=self.window,
            start_depth=start_cfg[0],
            start_width=start_cfg[1],
            budget_s=budget,
            start_acc=start_acc,
            trials="; ".join(f"{t.name}({t.depth},{t.width}): {t.done} rounds -> {t.val_acc:.4f}" for t in self.trials),
            winner=winner.name,
            depth=winner.depth,
            width=winner.width,
            val_acc=float(winner.val_acc),
            gain=float(winner.val_acc) - start_acc,
            sim_time_h=self.clock_s / 3600.0,
        )
        self.decisions.append(decision)
        log.info(
            "FedAdapter window %d: %s wins -> (d=%d, w=%d), val_acc %.4f",
            self.window,
            winner.name,
            *self.config,
            winner.val_acc,
        )
        self._extras |= {"sim_time_s": self.clock_s, "decision_val_acc": float(winner.val_acc)}
        state = self.results[best]
        self.start_acc = float(winner.val_acc)
        self.window += 1
        self.trials = []
        self.start_window(state)
        return state

    def round_extras(self) -> dict[str, float]:
        extras, self._extras = self._extras, {}
        return extras

    def may_stop(self) -> bool:
        # Only at a window's end: the clock then is the decided one, and no trial is left half done. A
        # decision opens the next window at once, so "just decided" is "no trial of this window ran yet".
        return self.phase == 0 and not any(t.done for t in self.trials)

    # -- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": list(self.config),
            "window": self.window,
            "phase": self.phase,
            "clock_s": self.clock_s,
            "start_acc": self.start_acc,
            "trials": [asdict(t) for t in self.trials],
            "window_start_state": self.window_start_state,
            "results": self.results,
            "decisions": [asdict(d) for d in self.decisions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = tuple(state["config"])  # type: ignore[assignment]
        self.window = int(state["window"])
        self.phase = int(state["phase"])
        self.clock_s = float(state["clock_s"])
        self.start_acc = state["start_acc"]
        self.trials = [Trial(**t) for t in state["trials"]]
        self.window_start_state = state["window_start_state"]
        self.results = dict(state["results"])
        self.decisions = [Decision(**d) for d in state["decisions"]]


class ProgressiveUpgrade(Callback):
    """FedAdapter's progressive upgrade of adapter depth and width, on top of :class:`RoundSync`.

    Needs ``model.method='adapter'`` and ``federation.cost_model`` (the trial budget is simulated time).
    Each Lightning epoch is one round of one trial group, so ``trainer.max_epochs`` counts the rounds of
    every group. The decisions are logged (``decisions.csv`` beside the logger's files) and kept in
    checkpoints.

    Args:
        start_depth / start_width: the starting configuration (paper: depth 0, width 8).
        depth_step: how many layers the deeper candidate adds (paper: 1, or 4 for harder tasks).
        width_step / max_width: the wider candidate's step and the largest width (paper: 8 and 64).
        clients_per_group: participants per group and round (paper: 5, three groups: 15 per round).
        candidates: which of ``shallow``, ``deeper``, ``wider`` each window tries.
        window_s: ``T0``, in simulated seconds (paper: 60-100 s for BERT-base on a TX2). If unset,
            ``window_rounds`` rounds of the starting configuration.
        window_rounds: sets ``T0`` when ``window_s`` is unset, in rounds of the start configuration (4: the
            paper's T0 over its uncached depth-0 round; docs/fedadapter.md gives the other readings).
        max_val_batches: validation batches used to score candidates (``None``: the whole split).
    """

    def __init__(
        self,
        start_depth: int = 0,
        start_width: int = 8,
        depth_step: int = 1,
        width_step: int = 8,
        max_width: int = 64,
        clients_per_group: int = 5,
        candidates: list[str] | None = None,
        window_s: float | None = None,
        window_rounds: float = 4.0,
        max_val_batches: int | None = None,
    ) -> None:
        super().__init__()
        candidates = list(candidates or CANDIDATES)
        bad = [c for c in candidates if c not in CANDIDATES]
        if bad or not candidates:
            raise ValueError(f"upgrade.candidates={candidates} must be a non-empty subset of {list(CANDIDATES)}")
        for name, value in (
            ("depth_step", depth_step),
            ("width_step", width_step),
            ("clients_per_group", clients_per_group),
        ):
            if value < 1:
                raise ValueError(f"upgrade.{name}={value} must be at least 1")
        if start_depth < 0 or start_width < 1 or start_width > max_width:
            raise ValueError(
                f"upgrade.start_depth={start_depth} must be >= 0 and upgrade.start_width={start_width} "
                f"within 1..max_width={max_width}"
            )
        if window_s is not None and not window_s > 0:
            raise ValueError(f"upgrade.window_s={window_s} must be a positive number of simulated seconds")
        if not window_rounds > 0:
            raise ValueError(f"upgrade.window_rounds={window_rounds} must be positive")
        self.start = (start_depth, start_width)
        self.depth_step, self.width_step, self.max_width = depth_step, width_step, max_width
        self.clients_per_group = clients_per_group
        self.candidates = candidates
        self.window_s = window_s
        self.window_rounds = window_rounds
        self.max_val_batches = max_val_batches
        self.strategy: TrialGroupStrategy | None = None
        self._pending_state: dict[str, Any] | None = None
        self._module: Any = None
        self._trainer: pl.Trainer | None = None
        self._sync: Any = None
        self._logged = 0  # decisions already written to decisions.csv

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_fedpeft.callbacks.round_sync import RoundSync

        sync = next((cb for cb in trainer.callbacks if isinstance(cb, RoundSync)), None)
        if sync is None:
            raise ValueError("ProgressiveUpgrade needs a RoundSync callback (the federation) in the Trainer")
        if getattr(pl_module, "adapter_injection", None) is None:
            raise ValueError("ProgressiveUpgrade needs model.method='adapter' (it grows bottleneck adapters)")
        if sync.cost_model is None:
            raise ValueError(
                "ProgressiveUpgrade needs federation.cost_model (trial groups share a simulated time budget); "
                "e.g. federation.cost_model: {device: tx2, bandwidth_mbps: 1.0}"
            )
        num_layers = len(pl_module.adapter_injection.layers)
        if self.start[0] > num_layers:
            raise ValueError(f"upgrade.start_depth={self.start[0]} exceeds the model's {num_layers} layers")
        self._module, self._trainer, self._sync = pl_module, trainer, sync
        if pl_module.adapter_config != self.start and self._pending_state is None:
            pl_module.resize_adapters(*self.start)  # the run starts from the starting configuration
        self.strategy = TrialGroupStrategy(
            clients_per_group=self.clients_per_group,
            num_layers=num_layers,
            start=self.start,
            window_s=self.window_s or 0.0,  # set in on_fit_start from window_rounds when unset
            grow_fn=self._grow,
            evaluate_fn=self._evaluate,
            cost_fn=self._round_cost,
            depth_step=self.depth_step,
            width_step=self.width_step,
            max_width=self.max_width,
            candidates=self.candidates,
            seed=sync.seed,
        )
        sync.strategy = self.strategy
        sync.clients_per_round = self.clients_per_group

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.strategy is not None
        if not self.strategy.window_s:  # after every setup, so RoundSync knows the data
            self.strategy.window_s = self.window_rounds * self._round_cost(self.start)
        if self._pending_state is not None:  # resuming: the checkpoint's window, not a fresh one
            self.strategy.load_state_dict(self._pending_state)
            self._pending_state = None
        if not self.strategy.trials and self._sync.launcher.is_server:
            self.strategy.start_window(trainable_state(pl_module))

    # -- what only a process with the model can do -------------------------------------------------------
    def _grow(self, state: TrainableState, config: Config) -> TrainableState:
        """``state`` grown (function-preserving) to ``config``; the module ends in that configuration."""
        module = self._module
        module.set_trainable_state(state)
        gen = torch.Generator().manual_seed(self._sync.seed * 7919 + config[0] * 131 + config[1])
        module.resize_adapters(*config, generator=gen)
        return trainable_state(module)

    def _evaluate(self, state: TrainableState) -> float:
        """Accuracy of ``state`` on the validation split (the activation cache is used if there is one)."""
        module, trainer = self._module, self._trainer
        module.set_trainable_state(state)
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else module.val_dataloader()
        cache = getattr(module, "activation_cache", None)
        was_training = module.training
        module.eval()
        correct = total = 0
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if self.max_val_batches is not None and i >= self.max_val_batches:
                    break
                batch = {k: v.to(module.device) for k, v in batch.items()}
                out = cache(module.model, batch) if cache is not None else module.model(**batch)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                total += int(batch["labels"].numel())
        module.train(was_training)
        if total == 0:
            raise ValueError("ProgressiveUpgrade scores candidates on the validation split, which is empty")
        return correct / total

    def _round_cost(self, config: Config) -> float:
        """Predicted simulated seconds of one client round in ``config``: local steps + download + upload."""
        module, sync = self._module, self._sync
        saved = trainable_state(module)
        gen = torch.Generator().manual_seed(0)
        module.resize_adapters(*config, generator=gen)
        try:
            batch = {k: v.to(module.device) for k, v in sync.sample_batch().items()}
            cache = getattr(module, "activation_cache", None)
            step, _ = sync.cost_model.step_flops(module.model, batch, cached=cache is not None)
            seconds = sync.cost_model.device.batch_seconds(step) * sync.mean_local_batches()
            nbytes = state_nbytes(trainable_state(module))
            seconds += 2 * sync.cost_model.comm_seconds(nbytes)
        finally:
            module.set_trainable_state(saved)
        return seconds

    # -- logging and checkpointing ----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = self.strategy
        if strategy is None or not self._sync.launcher.is_server or len(strategy.decisions) == self._logged:
            return  # act only after a round that closed a decision window
        self._logged = len(strategy.decisions)
        cache = getattr(pl_module, "activation_cache", None)
        if cache is not None:
            # Depth only grows: entries cached for a higher boundary will not be used again.
            cache.invalidate_above(len(pl_module.adapter_injection.layers) - strategy.config[0])
        write_log_table(trainer, "decisions.csv", [asdict(d) for d in strategy.decisions])

    @property
    def decisions(self) -> list[Decision]:
        return [] if self.strategy is None else list(self.strategy.decisions)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.strategy is None else self.strategy.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = dict(state_dict)


__all__ = ["CANDIDATES", "Decision", "ProgressiveUpgrade", "Trial", "TrialGroupStrategy"]
