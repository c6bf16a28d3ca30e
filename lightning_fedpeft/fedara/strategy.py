"""FedARA's server half: the budget schedule and the rank allocation over clients' importance values.

The server averages the updates (sample-weighted FedAvg) and the importance values clients upload (one
per active triplet), keeps a running score per triplet, and after each round applies the budget schedule
of :class:`BudgetSchedule` (warm-up rounds at the full budget, a cubic fall to the target, the last
rounds with the mask frozen): the lowest-scoring active triplets are masked until the budget holds.
One global mask serves every client, so averaging stays consistent. A masked triplet never comes back
(communication and compute only fall), and it is not sent any more: the global state carries only the
active triplets, and clients cut their layers to them (:mod:`lightning_fedpeft.tuners.svd`). The
server keeps the full ``r_init`` state and rebuilds it from every packed update. With ``prune_empty``
(:class:`~lightning_fedpeft.fedara.ModulePruning`), a module with no active triplet leaves the global
state. Plain torch: the client half is in :mod:`lightning_fedpeft.fedara.client`.

On a fleet (``client_devices`` given) every participant trains a nested prefix of the active triplets: the
``k_c`` most important by the server's score (ties: the triplets the allocation would mask last, i.e. the
top modules first), with ``k_c`` from its budget (:mod:`lightning_fedpeft.budgets`): the largest candidate
size whose predicted round time and memory fit its device. Each triplet is then averaged, by samples, over
the clients that trained it (and keeps its value if none did), and so is its importance: no zero-padding
bias. Allocation and pruning go on, on the global order, as without a fleet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fedpeft.aggregation import changed_outside, held_share
from lightning_fedpeft.budgets import CandidateCost, assign
from lightning_fedpeft.protocol import ClientUpdate, RoundPlan, TrainableState
from lightning_fedpeft.state import layer_of
from lightning_fedpeft.strategy import FedAvg, Query
from lightning_fedpeft.tuners.svd import module_names_in_state, pack, triplet_keys, unpack

IMPORTANCE = ".importance"  # suffix of a module's importance vector in ClientUpdate.tensors


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


# Candidate prefix sizes on a fleet, as shares of the active triplets (the first is the global configuration).
PREFIX_SHARES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)

Prefix = dict[str, list[int]]  # module -> positions among its active (packed) triplets


@dataclass(frozen=True)
class PrefixCosts(Query):
    """What each candidate prefix costs (answered by RankAllocation with the model and the cost model)."""

    state: TrainableState = field(repr=False)  # the packed global state the prefixes index
    prefixes: tuple[Prefix, ...] = field(repr=False)


def prefix_masks(state: Mapping[str, torch.Tensor], prefix: Prefix) -> dict[str, torch.Tensor]:
    """The coordinates of the packed ``state`` a client trains with ``prefix`` (SVD tensors only; the rest whole)."""
    masks: dict[str, torch.Tensor] = {}
    for module in module_names_in_state(state):
        e, a, b = triplet_keys(module)
        active = torch.zeros(state[e].shape[0], dtype=torch.bool)
        active[prefix.get(module, [])] = True
        masks[e], masks[a], masks[b] = active.reshape(-1, 1), active.reshape(-1, 1), active.reshape(1, -1)
    return masks


class RankAllocationStrategy(FedAvg):
    """The server half of FedARA (see the module docstring).

    While the mask may still change, the plan tells every client to upload importance values
    (instruction ``importance: true``); once it is frozen clients are told nothing and send none.

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
        client_devices: on a fleet, every client's device profile (client 0 first): turns on nested
            prefixes sized per client; ``None``: every client trains every active triplet.
        device_memory_gb: the fleet's profiles' memory (``None``: unlimited).
        round_budget_s: the round's time budget (``None``: the median participant's time at the global
            configuration).
    """

    def __init__(
        self,
        clients_per_round: int,
        schedule: BudgetSchedule,
        mask_every: int = 1,
        importance_beta: float = 0.5,
        prune_empty: bool = False,
        seed: int = 0,
        client_devices: Sequence[str] | None = None,
        device_memory_gb: Mapping[str, float | None] | None = None,
        round_budget_s: float | None = None,
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
        self.client_devices = list(client_devices) if client_devices is not None else None
        self.device_memory_gb = dict(device_memory_gb or {})
        self.round_budget_s = round_budget_s
        self._costs: list[CandidateCost] = []  # the candidates for the current order, once answered
        self._prefixes: tuple[Prefix, ...] = ()
        self._sizes: list[int] = []
        self._asked = False
        self._held: dict[int, dict[str, torch.Tensor]] = {}  # this round's clients' coordinates
        self._sent: TrainableState = {}  # this round's packed global state (what the held masks index)
        self._fleet_metrics: dict[str, float] = {}
        self._assigned: list[dict[str, Any]] = []  # every round's per-client configurations (a table)

    # -- the full state and the mask -------------------------------------------------------------------------
    def start(self, state: TrainableState) -> None:
        """Take ``state`` (every triplet active) as the full state and start with nothing masked."""
        self.full = {k: v.detach().clone() for k, v in state.items()}
        modules = module_names_in_state(state)
        if not modules:
            raise ValueError("FedARA needs SVD layers in the trainable state: set model.method='svd'")
        self.masks = {m: torch.ones(state[triplet_keys(m)[0]].shape[0], dtype=torch.bool) for m in modules}
        self.scores = {m: torch.zeros(len(mask), dtype=torch.float64) for m, mask in self.masks.items()}

    def initialize(self, global_state: TrainableState) -> None:
        if not self.masks:  # a resumed run keeps the checkpoint's triplets, mask and scores
            self.start(global_state)

    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        plan = super().configure_round(round_idx, num_clients)
        scoring = self.wants_importance(round_idx)
        plan.instructions = {cid: {"importance": True} for cid in plan.client_ids} if scoring else {}
        self._held, self._fleet_metrics = {}, {}
        if self.client_devices is None:
            return plan
        if not self._costs:
            raise RuntimeError("RankAllocationStrategy on a fleet: the candidate costs must be answered first")
        self._sent = self.global_state()
        devices = {cid: self.client_devices[cid] for cid in plan.client_ids}
        budget = assign(self._costs, devices, self.device_memory_gb, self.round_budget_s)
        for cid in plan.client_ids:
            prefix = self._prefixes[budget.choice[cid]]
            plan.instructions.setdefault(cid, {})["triplets"] = {m: list(ix) for m, ix in prefix.items()}
            self._held[cid] = prefix_masks(self._sent, prefix)
            size = self._costs[budget.choice[cid]].size
            self._assigned.append({"round": round_idx, "client": cid, "device": devices[cid], "triplets": size})
        sizes = [self._costs[i].size for i in budget.choice.values()]
        self._fleet_metrics = {
            "round_budget_s": budget.budget_s,
            "mean_client_triplets": sum(sizes) / len(sizes),
            "min_client_triplets": float(min(sizes)),
        } | budget.metrics()
        return plan

    def transfer_share(self, client_id: int) -> float:
        held = self._held.get(client_id)
        if held is None:
            return 1.0
        return held_share(self._sent, held)

    # -- the fleet's candidates: nested prefixes of the importance order -------------------------------------------
    def importance_order(self) -> list[tuple[str, int]]:
        """Active triplets, most important first, as ``(module, position among its active triplets)``.

        The reverse of the allocation's ranking (lowest score first; ties by module order, then index), so a
        prefix is what the allocation would keep longest; with equal scores (warm-up) the top modules come first.
        """
        ranked = sorted(
            (float(self.scores[m][i]), order, i, m)
            for order, m in enumerate(self.masks)
            for i in self.masks[m].nonzero().flatten().tolist()
        )
        positions = {
            m: {int(i): p for p, i in enumerate(mask.nonzero().flatten().tolist())} for m, mask in self.masks.items()
        }
        return [(m, positions[m][i]) for _, _, i, m in reversed(ranked)]

    def candidate_prefixes(self) -> tuple[list[int], tuple[Prefix, ...]]:
        """The candidate sizes (largest first, the global one first) and their prefixes."""
        order = self.importance_order()
        sizes = sorted(
            {max(1, round(share * len(order))) for share in PREFIX_SHARES} & set(range(1, len(order) + 1)), reverse=True
        )
        prefixes = []
        for size in sizes:
            prefix: Prefix = {}
            for m, pos in order[:size]:
                prefix.setdefault(m, []).append(pos)
            prefixes.append({m: sorted(ix) for m, ix in prefix.items()})
        return sizes, tuple(prefixes)

    def queries(self) -> list[Query]:
        if self.client_devices is None or self._costs or not self.masks:
            return []
        sizes, self._prefixes = self.candidate_prefixes()
        self._sizes = sizes
        return [PrefixCosts(self.global_state(), self._prefixes)]

    def answer(self, query: Query, value: Any) -> TrainableState | None:
        if not isinstance(query, PrefixCosts):
            return super().answer(query, value)
        self._costs = [
            CandidateCost(size, dict(cost["seconds"]), int(cost["memory_bytes"]))
            for size, cost in zip(self._sizes, value, strict=True)
        ]
        return None

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
        held = self._held.get(update.client_id)
        if held is not None and (name := changed_outside(update.state, self._sent, held)) is not None:
            return f"{name} changed outside the triplets this client was told to train"
        if not self.masks or not self.wants_importance(update.round):
            return None
        for m in self.masks:
            n = self.active(m)
            if n == 0:
                continue
            value = update.tensors.get(m + IMPORTANCE)
            if value is None:
                return f"no importance for {m} (is the RankAllocation callback in the client's Trainer?)"
            if tuple(value.shape) != (n,):
                return f"importance for {m} has shape {tuple(value.shape)}, expected ({n},) active triplets"
        return None

    def combines_parts(self) -> bool:
        return self.client_devices is not None  # nested prefixes

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        held = [self._held[u.client_id] for u in updates] if self._held else None
        averaged = self.combine(round_idx, global_state, updates, held)
        self.full = unpack(averaged, self.masks, self.full)
        if updates and self.wants_importance(round_idx):
            self._update_scores(updates)
        self._costs = []  # the order moved: the next round's candidates are asked again
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
            idx = mask.nonzero().flatten()
            if not self._held:
                mean = sum(u.tensors[m + IMPORTANCE].to(torch.float64) * (u.num_examples / total) for u in updates)
                self.scores[m][idx] = beta * self.scores[m][idx] + (1.0 - beta) * mean
                continue
            # On a fleet: each triplet's mean over the clients that trained it; one nobody trained keeps its score.
            e_key = triplet_keys(m)[0]
            acc = torch.zeros(len(idx), dtype=torch.float64)
            mass = torch.zeros(len(idx), dtype=torch.float64)
            for u in updates:
                held = self._held[u.client_id][e_key].reshape(-1).to(torch.float64)
                acc += u.tensors[m + IMPORTANCE].to(torch.float64) * held * u.num_examples
                mass += held * u.num_examples
            seen = mass > 0
            mean = acc / mass.clamp_min(1e-300)
            self.scores[m][idx[seen]] = beta * self.scores[m][idx[seen]] + (1.0 - beta) * mean[seen]

    def use_aggregator(self, aggregator: Any) -> None:
        if aggregator.private:
            raise ValueError(
                f"federation.aggregator={type(aggregator).__name__} does not work with RankAllocation: the importance "
                f"values clients send beside their updates are neither clipped nor noised, so no privacy guarantee "
                f"would cover them; drop one of the two"
            )
        super().use_aggregator(aggregator)

    def use_server_optimizer(self, optimizer: Any) -> None:
        raise ValueError(
            f"federation.server_optimizer={type(optimizer).__name__} does not work with RankAllocation: masking "
            f"removes triplets from the state between rounds, which the optimizer's moments cannot follow"
        )

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"client_configs": list(self._assigned)} if self.client_devices is not None else {}

    def round_metrics(self) -> dict[str, float]:
        if not self.masks:
            return {}
        live = self.live_modules
        layers = [layer for m in live if (layer := layer_of(m + ".")) is not None]
        return (
            super().round_metrics()
            | {
                "budget": float(self.schedule.budget(self.rounds_done)),
                "active_ranks": float(self.active_ranks),
                "live_modules": float(len(live)),
                "masked_now": float(self.last_masked),
                # backward stops at the lowest transformer layer that still has an adapted module
                "lowest_live_layer": float(min(layers)) if layers else -1.0,
            }
            | self._fleet_metrics
        )

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "full": {k: v.clone() for k, v in self.full.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "scores": {k: v.clone() for k, v in self.scores.items()},
            "rounds_done": self.rounds_done,
            "assigned": list(self._assigned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.full = {k: v.clone() for k, v in state["full"].items()}
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.scores = {k: v.clone() for k, v in state["scores"].items()}
        self.rounds_done = int(state["rounds_done"])
        self._assigned = list(state.get("assigned", []))
