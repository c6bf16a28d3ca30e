"""FedARA: federated rank allocation over truncated-SVD adapters, and pruning of modules left without rank.

The SVD adaptation itself is peft's AdaLoRA layer (``model.method='svd'``): ``ΔW = P Λ Q`` per adapted
linear layer, ``r_init`` triplets (P column, Λ entry, Q row) each, with the orthogonality penalty in the
loss. What is federated lives here; the paper gives no protocol, so this one is ours
(docs/fedara.md lists every choice):

Client half, :class:`RankAllocation` (a Lightning callback): during local training it keeps peft's
sensitivity and uncertainty averages (``I = |θ ∂L/∂θ|``, β1 = β2 = 0.85) and, with its update, uploads one
importance value per active triplet (``s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``, as AdaLoRA scores it).

Server half, :class:`RankAllocationStrategy`: averages the updates (sample-weighted FedAvg) and the
importance values, keeps a running score per triplet, and after each round applies the budget
schedule of :class:`BudgetSchedule` (warm-up rounds at the full budget, a cubic fall to the target, the
last rounds with the mask frozen): the lowest-scoring active triplets are masked until the budget holds.
One global mask serves every client, so averaging stays consistent. A masked triplet never comes back
(communication and compute only fall), and it is not sent any more: the global state carries only the
active triplets, and clients cut their layers to them (:mod:`lightning_fedpeft.tuners.svd`). The
server keeps the full ``r_init`` state and rebuilds it from every packed update.

:class:`ModulePruning` (a second callback) makes the server drop a module with no active triplet from
the global state; clients then put the frozen base layer back in its place, so it no longer runs, trains
or travels, and once no adapted module is left below a transformer layer, backward stops there. It logs
per round what that buys: step time and peak memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_fedpeft.callbacks.client_resources import ClientResources
from lightning_fedpeft.state import TrainableState, trainable_state
from lightning_fedpeft.strategy import ClientUpdate, FedAvg
from lightning_fedpeft.tuners.svd import (
    layer_rank,
    module_names_in_state,
    pack,
    svd_layers,
    triplet_keys,
    unpack,
)

log = logging.getLogger(__name__)

IMPORTANCE = ".importance"  # suffix of a module's importance vector in ClientUpdate.extras


@dataclass(frozen=True)
class BudgetSchedule:
    """How many triplets may be active after each round (AdaLoRA's step schedule, counted in rounds).

    Rounds ``1..warmup_rounds``: ``init_budget`` and no masking. Then a cubic fall,
    ``target + (init - target) * (1 - (t - warmup) / (total - final - warmup))**3`` after round ``t``,
    reaching ``target_budget`` after round ``total_rounds - final_rounds``; from then on the mask is frozen.
    """

    init_budget: int
    target_budget: int
    total_rounds: int
    warmup_rounds: int = 0
    final_rounds: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.target_budget <= self.init_budget:
            raise ValueError(
                f"the target budget ({self.target_budget} triplets) must be within 0..{self.init_budget} "
                f"(r_init x modules); lower allocation.target_rank"
            )
        if self.warmup_rounds < 0 or self.final_rounds < 0:
            raise ValueError("allocation.warmup_rounds and allocation.final_rounds must be >= 0")
        if self.warmup_rounds + self.final_rounds >= self.total_rounds:
            raise ValueError(
                f"allocation.warmup_rounds={self.warmup_rounds} + final_rounds={self.final_rounds} leave no round "
                f"to allocate in within total_rounds={self.total_rounds}; shorten them or train more rounds"
            )

    @property
    def last_mask_round(self) -> int:
        """After this round the budget is the target and the mask is frozen."""
        return self.total_rounds - self.final_rounds

    def budget(self, rounds_done: int) -> int:
        """Active triplets allowed after ``rounds_done`` rounds."""
        if rounds_done <= self.warmup_rounds:
            return self.init_budget
        if rounds_done >= self.last_mask_round:
            return self.target_budget
        left = 1.0 - (rounds_done - self.warmup_rounds) / (self.last_mask_round - self.warmup_rounds)
        return int(self.target_budget + (self.init_budget - self.target_budget) * left**3)

    def phase(self, rounds_done: int) -> str:
        """``warmup``, ``decay`` or ``final`` (mask frozen) after ``rounds_done`` rounds."""
        if rounds_done <= self.warmup_rounds:
            return "warmup"
        return "decay" if rounds_done <= self.last_mask_round else "final"

    def masks_after(self, rounds_done: int, every: int = 1) -> bool:
        """Whether the server re-allocates after round ``rounds_done`` (every ``every`` decay rounds, and at
        the last mask round)."""
        if rounds_done == self.last_mask_round:
            return True
        return self.phase(rounds_done) == "decay" and (rounds_done - self.warmup_rounds) % every == 0


class RankAllocationStrategy(FedAvg):
    """The server half of FedARA (see the module docstring).

    Args:
        clients_per_round: participants per round.
        schedule: the budget over rounds.
        mask_every: re-allocate every this many rounds of the decay phase (AdaLoRA's ``deltaT``).
        importance_beta: the server's running score per triplet is
            ``beta * score + (1 - beta) * (this round's sample-weighted mean of the clients' values)``;
            it smooths out which clients happened to be sampled.
        prune_empty: leave a module with no active triplet out of the global state (set by
            :class:`ModulePruning`); otherwise it stays with zero-size tensors.
        seed: seeds the choice of participants.
    """

    def __init__(
        self,
        clients_per_round: int,
        schedule: BudgetSchedule,
        mask_every: int = 1,
        importance_beta: float = 0.5,
        prune_empty: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(clients_per_round, seed=seed)
        if mask_every < 1:
            raise ValueError(f"allocation.mask_every={mask_every} must be at least 1")
        if not 0.0 <= importance_beta < 1.0:
            raise ValueError(f"allocation.importance_beta={importance_beta} must be within [0, 1)")
        self.schedule = schedule
        self.mask_every = mask_every
        self.importance_beta = importance_beta
        self.prune_empty = prune_empty
        self.full: TrainableState = {}  # every triplet, r_init per module (masked ones keep their last value)
        self.masks: dict[str, torch.Tensor] = {}  # module -> bool (r_init,)
        self.scores: dict[str, torch.Tensor] = {}  # module -> float (r_init,), running importance
        self.rounds_done = 0
        self.last_masked = 0

    # -- the full state and the mask -------------------------------------------------------------------------
    def start(self, state: TrainableState) -> None:
        """Take ``state`` (every triplet active) as the full state and start with nothing masked."""
        self.full = {k: v.detach().clone() for k, v in state.items()}
        modules = module_names_in_state(state)
        if not modules:
            raise ValueError("FedARA needs SVD layers in the trainable state: set model.method='svd'")
        self.masks = {m: torch.ones(state[triplet_keys(m)[0]].shape[0], dtype=torch.bool) for m in modules}
        self.scores = {m: torch.zeros(len(mask), dtype=torch.float64) for m, mask in self.masks.items()}

    def active(self, module: str) -> int:
        return int(self.masks[module].sum())

    @property
    def active_ranks(self) -> int:
        return sum(self.active(m) for m in self.masks)

    @property
    def live_modules(self) -> list[str]:
        return [m for m in self.masks if self.active(m) > 0]

    def wants_importance(self, round_idx: int) -> bool:
        """Whether clients of round ``round_idx`` upload importance (not once the mask is frozen)."""
        return round_idx + 1 <= self.schedule.last_mask_round

    def global_state(self) -> TrainableState:
        """What the clients get: the active triplets only."""
        return pack(self.full, self.masks, drop_empty=self.prune_empty)

    def allocate(self, budget: int) -> list[tuple[str, int]]:
        """Mask the lowest-scoring active triplets until at most ``budget`` remain; return those masked.

        Ties go by module order, then triplet index, so every run masks the same ones.
        """
        excess = self.active_ranks - budget
        if excess <= 0:
            return []
        ranked = sorted(
            (float(self.scores[m][i]), order, i, m)
            for order, m in enumerate(self.masks)
            for i in self.masks[m].nonzero().flatten().tolist()
        )
        dropped = [(m, i) for _, _, i, m in ranked[:excess]]
        for m, i in dropped:
            self.masks[m][i] = False
        return dropped

    # -- Strategy -----------------------------------------------------------------------------------------------
    def check_update(self, update: ClientUpdate) -> str | None:
        if not self.masks or not self.wants_importance(update.round):
            return None
        for m in self.masks:
            n = self.active(m)
            if n == 0:
                continue
            value = update.extras.get(m + IMPORTANCE)
            if value is None:
                return f"no importance for {m} (is the RankAllocation callback in the client's Trainer?)"
            if tuple(value.shape) != (n,):
                return f"importance for {m} has shape {tuple(value.shape)}, expected ({n},) active triplets"
        return None

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        if not self.masks:
            self.start(global_state)
        averaged = super().aggregate(round_idx, global_state, updates)
        self.full = unpack(averaged, self.masks, self.full)
        if updates and self.wants_importance(round_idx):
            self._update_scores(updates)
        self.rounds_done = round_idx + 1
        self.last_masked = 0
        if self.schedule.masks_after(self.rounds_done, self.mask_every):
            self.last_masked = len(self.allocate(self.schedule.budget(self.rounds_done)))
        return self.global_state()

    def _update_scores(self, updates: Sequence[ClientUpdate]) -> None:
        total = sum(u.num_examples for u in updates)
        beta = self.importance_beta
        for m, mask in self.masks.items():
            if not mask.any():
                continue
            mean = sum(u.extras[m + IMPORTANCE].to(torch.float64) * (u.num_examples / total) for u in updates)
            idx = mask.nonzero().flatten()
            self.scores[m][idx] = beta * self.scores[m][idx] + (1.0 - beta) * mean

    def round_extras(self) -> dict[str, float]:
        if not self.masks:
            return {}
        live = self.live_modules
        layers = [int(x.group(1)) for m in live if (x := re.search(r"\.layer\.(\d+)\.", m))]
        return {
            "budget": float(self.schedule.budget(self.rounds_done)),
            "active_ranks": float(self.active_ranks),
            "live_modules": float(len(live)),
            "masked_now": float(self.last_masked),
            # backward stops at the lowest transformer layer that still has an adapted module
            "lowest_live_layer": float(min(layers)) if layers else -1.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "full": {k: v.clone() for k, v in self.full.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "scores": {k: v.clone() for k, v in self.scores.items()},
            "rounds_done": self.rounds_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.full = {k: v.clone() for k, v in state["full"].items()}
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.scores = {k: v.clone() for k, v in state["scores"].items()}
        self.rounds_done = int(state["rounds_done"])


def _find_round_sync(trainer: pl.Trainer, who: str) -> Any:
    from lightning_fedpeft.callbacks.round_sync import RoundSync

    sync = next((cb for cb in trainer.callbacks if isinstance(cb, RoundSync)), None)
    if sync is None:
        raise ValueError(f"{who} needs a RoundSync callback (the federation) in the Trainer")
    return sync


class RankAllocation(Callback):
    """FedARA's federated rank allocation on top of :class:`RoundSync` (client half; builds the server half).

    Needs SVD layers (``model.method='svd'``) and a module whose ``set_trainable_state`` adopts the ranks of
    the state it gets (:class:`~lightning_fedpeft.FedPEFTModule` does). Each round's importance values,
    budget, active ranks and live modules go to ``rounds.csv``; the server's state (full triplets, mask,
    scores, schedule position) rides in checkpoints.

    Args:
        target_rank: the average rank per module at the end (the budget falls to ``target_rank x modules``).
        total_rounds: the schedule's length in rounds (default: ``trainer.max_epochs``).
        warmup_rounds: rounds at the full budget before any masking.
        final_rounds: rounds at the end with the mask frozen.
        mask_every: re-allocate every this many rounds during the fall.
        importance_beta: smoothing of the server's score over rounds (0: only the latest round counts).
        beta1 / beta2: AdaLoRA's smoothing of sensitivity and uncertainty over local steps.
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
        self.prune_empty = False  # ModulePruning switches it on
        self.strategy: RankAllocationStrategy | None = None
        self._allocator: Any = None
        self._sync: Any = None
        self._round = 0
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sync = _find_round_sync(trainer, "RankAllocation")
        model = getattr(pl_module, "model", pl_module)
        layers = svd_layers(model)
        if not layers:
            raise ValueError("RankAllocation needs SVD layers: set model.method='svd' (peft's AdaLoRA layers)")
        if not callable(getattr(pl_module, "set_trainable_state", None)):
            raise ValueError(
                "RankAllocation needs a LightningModule whose set_trainable_state adopts the ranks of the state "
                "(use lightning_fedpeft.FedPEFTModule with method='svd')"
            )
        r_init = {int(round(float(layer.ranknum["default"]))) for layer in layers.values()}
        if len(r_init) != 1:
            raise ValueError(f"RankAllocation needs one r_init for every SVD layer, found {sorted(r_init)}")
        total = self.total_rounds if self.total_rounds is not None else trainer.max_epochs
        if total is None or total < 1:
            raise ValueError("RankAllocation needs allocation.total_rounds or a positive trainer.max_epochs")
        n_modules = len(layers) if self._pending_state is None else len(self._pending_state["masks"])
        init_budget = r_init.pop() * n_modules
        schedule = BudgetSchedule(
            init_budget=init_budget,
            target_budget=min(init_budget, int(round(self.target_rank * n_modules))),
            total_rounds=total,
            warmup_rounds=self.warmup_rounds,
            final_rounds=self.final_rounds,
        )
        self.strategy = RankAllocationStrategy(
            sync.clients_per_round,
            schedule,
            mask_every=self.mask_every,
            importance_beta=self.importance_beta,
            prune_empty=self.prune_empty,
            seed=sync.seed,
        )
        sync.strategy = self.strategy
        if self not in sync.client_hooks:
            sync.client_hooks.append(self)
        self._sync = sync
        from peft.tuners.adalora.layer import RankAllocator

        config = getattr(model, "peft_config", {}).get("default")
        if config is None:
            raise ValueError("RankAllocation needs a peft AdaLoRA model (model.method='svd')")
        config = type(config)(**{**config.to_dict(), "beta1": self.beta1, "beta2": self.beta2})
        # peft's allocator keeps AdaLoRA's per-element sensitivity and uncertainty averages; its budget
        # and masking are not used (the server allocates).
        self._allocator = RankAllocator(model, config, "default")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.strategy is not None
        if self._pending_state is not None:  # resuming: the checkpoint's triplets, mask and scores
            self.strategy.load_state_dict(self._pending_state)
            self._pending_state = None
        elif not self.strategy.masks:  # so the server checks the importance of round 0's updates too
            self.strategy.start(trainable_state(pl_module))

    # -- the client half: importance over local steps ------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._round = trainer.current_epoch

    def on_client_start(self, pl_module: pl.LightningModule) -> None:
        self._allocator.reset_ipt()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.strategy is not None and self.strategy.wants_importance(self._round):
            self._allocator.update_ipt(getattr(pl_module, "model", pl_module))

    def on_client_end(self, pl_module: pl.LightningModule) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if self.strategy is None or not self.strategy.wants_importance(self._round):
            return {}, {}
        return triplet_importance(pl_module, self._allocator), {}

    # -- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.strategy is None or not self.strategy.masks else self.strategy.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = dict(state_dict)


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

    Needs :class:`RankAllocation`. The server then drops such a module from the global state, and every
    client that receives it puts the frozen base layer back in the module's place
    (:func:`~lightning_fedpeft.tuners.svd.prune_layer`): the module no longer runs, its parameters leave the
    optimizer and the wire, and autograd stops below the lowest layer that still has a trainable module.
    What that buys is logged per round (as :class:`~lightning_fedpeft.callbacks.ClientResources` does:
    ``step_time_ms``, ``peak_rss_mb``, ``saved_activation_mb``) beside RankAllocation's ``active_ranks``,
    ``live_modules`` and ``lowest_live_layer``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        allocation = next((cb for cb in trainer.callbacks if isinstance(cb, RankAllocation)), None)
        if allocation is None:
            raise ValueError("ModulePruning needs the RankAllocation callback (it prunes what allocation masks)")
        allocation.prune_empty = True
        if allocation.strategy is not None:
            allocation.strategy.prune_empty = True
        super().setup(trainer, pl_module, stage)


__all__ = [
    "BudgetSchedule",
    "ModulePruning",
    "RankAllocation",
    "RankAllocationStrategy",
    "triplet_importance",
]
