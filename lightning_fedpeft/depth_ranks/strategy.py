"""FedAdapter x FedARA, the server half: progressive depth over SVD adapters whose ranks the server allocates.

The model has SVD adapters (peft's AdaLoRA layers, ``r_init`` triplets) in every targeted module of every
layer, but only the modules of the top ``d`` layers are *live*: they train and travel; the ones below are
*dormant*, at rank 0 (zero-size tensors in the state, frozen on the clients, so backward stops above them).

* **Depth, as FedAdapter.** Every decision window the trial groups of
  :class:`~lightning_fedpeft.fedadapter.strategy.TrialGroupStrategy` train the current depth (``shallow``)
  and ``d + depth_step`` (``deeper``) from the same global model, each for the same simulated time budget;
  the higher validation accuracy wins. Going deeper wakes the modules of the next layers with the triplets
  they were built with: Λ is 0 there, so the grown model computes what the shallow one did.
* **Ranks, as FedARA.** Clients upload one importance value per live triplet (AdaLoRA's score, as
  :class:`~lightning_fedpeft.fedara.RankAllocation` computes it). At each decision the winning group's
  values, averaged over its rounds, update the server's running score per triplet, and the server masks the
  lowest-scoring live triplets until the live modules hold ``rank_per_module(window) x live modules``: a
  cubic fall from ``r_init`` to ``target_rank`` over ``decay_windows`` windows after ``warmup_windows``. A
  triplet is masked only once it has been scored, and the budget counts only modules scored at least once, so the
  modules a deeper decision just woke neither lose triplets nor cost the others any before they trained.
  Masked triplets never come back.

The server keeps every module's ``r_init`` triplets (``full``), as FedARA does, and packs what travels:
live modules with their active triplets. All trials of a window share the window's mask.

On a fleet the trial groups are drawn within device classes, as FedAdapter's, and (``per_client_depth``)
every client trains the modules of the top ``d_c`` of the trial's ``d`` live layers that fit its memory and
the round's time budget (:mod:`lightning_fedpeft.budgets`); the live modules below stay as received. Each
module is averaged over the clients that trained it, its importance too, so the ranks are allocated on
what was trained. Plain torch: the client half is :class:`~lightning_fedpeft.depth_ranks.DepthRankUpgrade`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fedpeft.fedadapter.strategy import DepthCosts, GrowState, RoundCost, TrialGroupStrategy
from lightning_fedpeft.fedara.strategy import IMPORTANCE
from lightning_fedpeft.protocol import ClientUpdate, RoundPlan, TrainableState
from lightning_fedpeft.state import layer_of
from lightning_fedpeft.tuners.svd import module_names_in_state, pack, triplet_keys, unpack


@dataclass(frozen=True, eq=False)  # one query is one question: identity, not value
class StateCost(RoundCost):
    """The predicted simulated seconds (a float) of one client round training ``state`` (of depth ``config[0]``)."""

    state: TrainableState = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)  # one query is one question: identity, not value
class StateDepthCosts(DepthCosts):
    """On a fleet: :class:`DepthCosts` of training ``state`` (of depth ``config[0]``), per train depth."""

    state: TrainableState = field(default_factory=dict, repr=False)


class DepthRankStrategy(TrialGroupStrategy):
    """The server half of FedAdapter x FedARA (see the module docstring).

    Args:
        clients_per_group: participants per trial group and round.
        initial: the trainable state with every module at ``r_init`` (what dormant modules wake up with).
        num_layers: transformer layers of the model.
        start_depth: live layers at the start.
        target_rank: average triplets per live module at the end of the fall.
        warmup_windows / decay_windows: windows before the fall, and the fall's length in windows.
        importance_beta: the running score's smoothing (``beta * score + (1 - beta) * mean``).
        window_s / window_rounds / depth_step / seed: as :class:`TrialGroupStrategy`.
        client_devices: on a fleet, every client's device profile: trial groups are drawn within device
            classes as :class:`TrialGroupStrategy` draws them.
        device_memory_gb / round_budget_s: on a fleet, the profiles' memory and a round's time budget
            (``None``: the median participant's time at the trial's depth), as :class:`TrialGroupStrategy`.
        per_client_depth: on a fleet, size each client's train depth (``False``: every client trains the
            trial's whole depth, and a round lasts as long as its slowest device).
    """

    def __init__(
        self,
        clients_per_group: int,
        initial: TrainableState,
        num_layers: int,
        start_depth: int,
        target_rank: float = 1.0,
        warmup_windows: int = 1,
        decay_windows: int = 3,
        importance_beta: float = 0.5,
        window_s: float | None = None,
        window_rounds: float = 4.0,
        depth_step: int = 1,
        seed: int = 0,
        client_devices: Sequence[str] | None = None,
        device_memory_gb: dict[str, float | None] | None = None,
        round_budget_s: float | None = None,
        per_client_depth: bool = True,
    ) -> None:
        modules = module_names_in_state(initial)
        if not modules:
            raise ValueError("DepthRankUpgrade needs SVD layers in the trainable state: set model.method='svd'")
        ranks = {int(initial[triplet_keys(m)[0]].shape[0]) for m in modules}
        if len(ranks) != 1:
            raise ValueError(f"DepthRankUpgrade needs one r_init for every SVD module, found {sorted(ranks)}")
        self.r_init = ranks.pop()
        super().__init__(
            clients_per_group,
            num_layers,
            start=(start_depth, self.r_init),
            window_s=window_s,
            window_rounds=window_rounds,
            depth_step=depth_step,
            width_step=1,
            max_width=self.r_init,
            candidates=("shallow", "deeper"),
            seed=seed,
            client_devices=client_devices,
            device_memory_gb=device_memory_gb,
            round_budget_s=round_budget_s,
            per_client_depth=per_client_depth,
        )
        if not 0 <= target_rank <= self.r_init:
            raise ValueError(f"depth_ranks.target_rank={target_rank} must be within 0..r_init={self.r_init}")
        if warmup_windows < 0 or decay_windows < 1:
            raise ValueError("depth_ranks.warmup_windows must be >= 0 and decay_windows >= 1")
        if not 0.0 <= importance_beta < 1.0:
            raise ValueError(f"depth_ranks.importance_beta={importance_beta} must be within [0, 1)")
        self.target_rank, self.importance_beta = target_rank, importance_beta
        self.warmup_windows, self.decay_windows = warmup_windows, decay_windows
        self.layer = {m: layer_of(m + ".") for m in modules}
        if any(v is None for v in self.layer.values()):
            raise ValueError("DepthRankUpgrade needs every SVD module inside a transformer layer (.layer.N.)")
        self.full = {k: v.detach().clone() for k, v in initial.items()}
        self.masks = {m: torch.ones(self.r_init, dtype=torch.bool) for m in modules}
        self.scores = {m: torch.zeros(self.r_init, dtype=torch.float64) for m in modules}
        self.scored = {m: torch.zeros(self.r_init, dtype=torch.bool) for m in modules}
        self._importance: dict[int, dict[str, torch.Tensor]] = {}  # trial phase -> module -> summed means
        self._importance_rounds: dict[int, dict[str, int]] = {}  # trial phase -> module -> rounds summed
        self._masked_now = 0

    # -- which triplets travel at a depth ------------------------------------------------------------------
    def live(self, module: str, depth: int) -> bool:
        return self.layer[module] >= self.num_layers - depth

    def effective_masks(self, depth: int) -> dict[str, torch.Tensor]:
        """The mask of what travels at ``depth``: active triplets of live modules, nothing of dormant ones."""
        return {m: mask & self.live(m, depth) for m, mask in self.masks.items()}

    def packed(self, depth: int) -> TrainableState:
        return pack(self.full, self.effective_masks(depth), drop_empty=False)

    def rank_per_module(self, windows_done: int) -> float:
        """The average triplets a live module may hold after ``windows_done`` decisions."""
        t = min(1.0, max(0, windows_done - self.warmup_windows) / self.decay_windows)
        return self.target_rank + (self.r_init - self.target_rank) * (1.0 - t) ** 3

    def allocate(self, depth: int, windows_done: int) -> int:
        """Mask the lowest-scoring scored live triplets until the budget holds; return how many were masked."""
        # Only modules scored at least once count: a module a deeper decision just woke joins the budget (and
        # may lose triplets) after it trained, rather than making the others pay for its untrained ranks.
        live = [m for m in self.masks if self.live(m, depth) and bool(self.scored[m].any())]
        budget = int(round(self.rank_per_module(windows_done) * len(live)))
        active = sum(int(self.masks[m].sum()) for m in live)
        ranked = sorted(
            (float(self.scores[m][i]), order, i, m)
            for order, m in enumerate(live)
            for i in (self.masks[m] & self.scored[m]).nonzero().flatten().tolist()
        )
        dropped = ranked[: max(0, active - budget)]
        for _, _, i, m in dropped:
            self.masks[m][i] = False
        return len(dropped)

    # -- TrialGroupStrategy's hooks, with the window's mask ---------------------------------------------------
    def _open_window(self, state: TrainableState) -> None:
        if self.decisions and self.trials:  # right after a decision: `state` is the winner's, at its depth
            depth = self.config[0]
            winner = [t.name for t in self.trials].index(self.decisions[-1].winner)
            self.full = unpack(state, self.effective_masks(depth), self.full)
            self._take_scores(winner, depth)
            self._masked_now = self.allocate(depth, self.window)
            state = self.packed(depth)
        self._importance, self._importance_rounds = {}, {}
        super()._open_window(state)
        # Costs are asked with the state each candidate trains (its depth, the window's mask); on a fleet with
        # per-client depths, per train depth.
        self._pending = [self._with_state(q) for q in self._pending]

    def _with_state(self, query: Any) -> Any:
        if type(query) is DepthCosts and self.per_client_depth:
            return StateDepthCosts(query.config, state=self.packed(query.config[0]))
        if type(query) in (RoundCost, DepthCosts):
            return StateCost(query.config, state=self.packed(query.config[0]))
        return query

    def _decide(self) -> TrainableState:
        super()._decide()
        assert self.window_start_state is not None
        self._global = self.window_start_state
        return self.window_start_state  # the winner's state under the new mask

    def answer(self, query: Any, value: Any) -> TrainableState | None:
        out = super().answer(query, value)
        grow = [q for q in self._pending if isinstance(q, GrowState)]
        for q in grow:  # the next trial's state: the window's model at its depth, woken modules as built
            self._pending.remove(q)
            out = self.packed(q.config[0])
            self._global = out
        return out

    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        plan = super().configure_round(round_idx, num_clients)
        for told in plan.instructions.values():
            told["importance"] = True
        return plan

    def _held(self, client_id: int, state: TrainableState) -> dict[str, torch.Tensor]:
        """The live modules a fleet client did not train (below its top ``train_depth`` layers) as all-False
        masks: the client sends them back as it got them, and they are averaged over the others."""
        depth = self._train_depth.get(client_id)
        if depth is None:
            return {}
        trial_depth = self.trials[self.phase].depth
        below = [m for m in self.masks if self.live(m, trial_depth) and not self.live(m, depth)]
        return {k: torch.zeros((), dtype=torch.bool) for m in below for k in triplet_keys(m) if k in state}

    def trains(self, client_id: int, module: str) -> bool:
        """Whether ``client_id`` trained ``module`` this round (a fleet client only its top layers' modules)."""
        depth = self._train_depth.get(client_id)
        return depth is None or self.live(module, depth)

    def check_update(self, update: ClientUpdate) -> str | None:
        depth = self.trials[self.phase].depth if self.trials else self.config[0]
        for m, mask in self.effective_masks(depth).items():
            n = int(mask.sum())
            value = update.tensors.get(m + IMPORTANCE)
            if n and value is None:
                return f"no importance for {m} (is DepthRankUpgrade in the client's Trainer?)"
            if n and tuple(value.shape) != (n,):
                return f"importance for {m} has shape {tuple(value.shape)}, expected ({n},) live triplets"
        return super().check_update(update)

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        phase = self.phase
        out = super().aggregate(round_idx, global_state, updates)
        # This round's sample-weighted mean importance per module, over the clients that trained it, summed per trial.
        sums = self._importance.setdefault(phase, {})
        counts = self._importance_rounds.setdefault(phase, {})
        for m in self.masks:
            key = m + IMPORTANCE
            if not updates or not all(key in u.tensors for u in updates) or not updates[0].tensors[key].numel():
                continue  # a dormant (or emptied) module: nothing to score
            trained = [u for u in updates if self.trains(u.client_id, m)]
            if not trained:
                continue  # every client of the round trained only layers above it
            total = sum(u.num_examples for u in trained)
            mean = sum(u.tensors[key].to(torch.float64) * (u.num_examples / total) for u in trained)
            sums[m] = sums.get(m, torch.zeros_like(mean)) + mean
            counts[m] = counts.get(m, 0) + 1
        return out

    def _take_scores(self, phase: int, depth: int) -> None:
        beta = self.importance_beta
        counts = self._importance_rounds.get(phase, {})
        for m, summed in self._importance.get(phase, {}).items():
            idx = self.effective_masks(depth)[m].nonzero().flatten()
            if len(idx) != len(summed):
                continue  # the winner trained another shape (cannot happen within one window's mask)
            mean = summed / counts[m]
            first = ~self.scored[m][idx]
            self.scores[m][idx] = torch.where(first, mean, beta * self.scores[m][idx] + (1 - beta) * mean)
            self.scored[m][idx] = True

    def round_metrics(self) -> dict[str, float]:
        depth = self.trials[self.phase].depth if self.trials and self.phase < len(self.trials) else self.config[0]
        live = [m for m in self.masks if self.live(m, depth)]
        metrics = {
            "live_modules": float(len(live)),
            "active_ranks": float(sum(int(self.masks[m].sum()) for m in live)),
            "rank_per_module": self.rank_per_module(self.window),
            "masked_now": float(self._masked_now),
        }
        self._masked_now = 0
        return super().round_metrics() | metrics

    def use_aggregator(self, aggregator: Any) -> None:
        if aggregator.private:
            raise ValueError(
                f"federation.aggregator={type(aggregator).__name__} does not work with DepthRankUpgrade: the "
                f"importance values clients send are neither clipped nor noised; drop one of the two"
            )
        super().use_aggregator(aggregator)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "full": {k: v.clone() for k, v in self.full.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "scores": {k: v.clone() for k, v in self.scores.items()},
            "scored": {k: v.clone() for k, v in self.scored.items()},
            "importance": {p: {m: v.clone() for m, v in d.items()} for p, d in self._importance.items()},
            "importance_rounds": {p: dict(d) for p, d in self._importance_rounds.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(dict(state))
        self.full = {k: v.clone() for k, v in state["full"].items()}
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.scores = {k: v.clone() for k, v in state["scores"].items()}
        self.scored = {k: v.clone() for k, v in state["scored"].items()}
        self._importance = {int(p): dict(d) for p, d in state["importance"].items()}
        # A checkpoint from before per-client depths counted rounds per trial: every scored module had them all.
        self._importance_rounds = {
            int(p): {m: int(n) for m in self._importance.get(int(p), {})} if isinstance(n, int) else dict(n)
            for p, n in state["importance_rounds"].items()
        }
