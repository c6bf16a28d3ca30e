"""FedAdapter's server half: trial groups that try candidate adapter configurations, and the decision.

Every decision window the server trains candidate configurations from the same global model: the current
one ``(d, w)``, a deeper one ``(d + depth_step, w)`` and a wider one ``(d, w + width_step)``, each by its
own group of participants, which the plan tells the configuration to train (instructions
``adapter_depth`` / ``adapter_width``). Every group gets the same *simulated* time budget
``W = T0 * (4 d + 1)``, so a cheaper configuration runs more rounds (``floor(W / c_k)`` for a per-round
cost ``c_k``). At the end of the window each candidate is scored on the validation split, the one with
the highest accuracy (= the most accuracy gained in the same time) wins, and everyone continues from the
winner's model. The clock advances by the winner's simulated time: the groups run side by side on real
devices. Here they run one after the other (each Lightning epoch is one round of one group).

Plain torch: what needs the model (a state's validation accuracy, a state grown to a configuration, a
configuration's per-round cost) is asked as a query, which the client half
(:class:`~lightning_fedpeft.fedadapter.ProgressiveUpgrade`) answers on the server's process.

On a fleet (``client_devices`` given), two things change. The trial groups are drawn within device
classes: every group of a round gets the same number of clients of each device (the fleet's shares,
rounded by largest remainder), so a trial's verdict is on its configuration, not on the device mix it drew.
And every client trains the top ``d_c`` adapters of the trial's ``d`` that fit its memory and the round's
time budget (:mod:`lightning_fedpeft.budgets`; the adapters below stay as received), each adapter averaged
over the clients that trained it. A configuration's per-round cost is then the predicted round time of the
whole fleet with those budgets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lightning_fedpeft.aggregation import changed_outside, held_share
from lightning_fedpeft.budgets import CandidateCost, assign
from lightning_fedpeft.fleet import largest_remainder
from lightning_fedpeft.protocol import ClientUpdate, RoundPlan, TrainableState
from lightning_fedpeft.seeds import derived_seed
from lightning_fedpeft.state import layer_of
from lightning_fedpeft.strategy import FedAvg, Query

log = logging.getLogger(__name__)

Config = tuple[int, int]  # (depth, width)
CANDIDATES: tuple[str, ...] = ("shallow", "deeper", "wider")


@dataclass(frozen=True, eq=False)  # one query is one question: identity, not value
class EvaluateState(Query):
    """The validation accuracy (a float) of ``state``; ``purpose`` is ``start`` or ``trial``."""

    state: TrainableState = field(repr=False)
    purpose: str


@dataclass(frozen=True, eq=False)  # one query is one question: identity, not value
class GrowState(Query):
    """``state`` grown (function-preserving, seeded by the configuration) to ``config``."""

    state: TrainableState = field(repr=False)
    config: Config


@dataclass(frozen=True, eq=False)  # one query is one question: identity, not value
class RoundCost(Query):
    """The predicted simulated seconds (a float) of one client round in ``config``."""

    config: Config


@dataclass(frozen=True, eq=False)  # one query is one question: identity, not value
class DepthCosts(Query):
    """On a fleet: for ``config``, each train depth's (``depth`` down to 1) predicted round seconds per device
    profile and counted memory, as ``[{"depth": d, "seconds": {device: s}, "memory_bytes": m}, ...]``."""

    config: Config


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
    """The outcome of one decision window (a row of ``decisions.csv``)."""

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


class TrialGroupStrategy(FedAvg):
    """The server half of FedAdapter (see the module docstring).

    A :class:`~lightning_fedpeft.strategy.FedAvg` (as FedARA's strategy is): each trial group's round is
    averaged by it, with its aggregator, whose state rides in this strategy's checkpoint state.

    Args:
        clients_per_group: participants per trial group and round (the run's clients per round).
        num_layers: transformer layers of the model (the deepest possible configuration).
        start: the starting ``(depth, width)``.
        window_s: ``T0`` in simulated seconds; the window budget is ``T0 * (4 d + 1)``. If ``None``,
            ``window_rounds`` rounds of the starting configuration.
        window_rounds: see ``window_s``.
        depth_step / width_step / max_width: how candidates grow.
        candidates: which of ``shallow``, ``deeper``, ``wider`` are tried each window.
        seed: seeds the sampling of groups.
        client_devices: on a fleet, every client's device profile (client 0 first); see the module docstring.
        device_memory_gb: the fleet's profiles' memory (``None``: unlimited).
        round_budget_s: a round's time budget on a fleet (``None``: the median participant's time at the
            trial's configuration).
        per_client_depth: on a fleet, size each client's train depth (``False``: every client trains the
            whole configuration, and a round lasts as long as its slowest device).
    """

    def __init__(
        self,
        clients_per_group: int,
        num_layers: int,
        start: Config,
        window_s: float | None = None,
        window_rounds: float = 4.0,
        depth_step: int = 1,
        width_step: int = 8,
        max_width: int = 64,
        candidates: Sequence[str] = CANDIDATES,
        seed: int = 0,
        client_devices: Sequence[str] | None = None,
        device_memory_gb: dict[str, float | None] | None = None,
        round_budget_s: float | None = None,
        per_client_depth: bool = True,
    ) -> None:
        super().__init__(clients_per_group, seed=seed)
        self.num_layers = num_layers
        self.start: Config = (int(start[0]), int(start[1]))
        self.config: Config = self.start
        self.window_s = window_s
        self.window_rounds = window_rounds
        self.depth_step, self.width_step, self.max_width = depth_step, width_step, max_width
        self.candidates = tuple(candidates)
        self.window = 0
        self.trials: list[Trial] = []
        self.phase = 0
        self.window_start_s = 0.0  # the clock when the current window opened
        self.start_acc: float | None = None
        self.window_start_state: TrainableState | None = None
        self.results: dict[int, TrainableState] = {}
        self.decisions: list[Decision] = []
        self._pending: list[Query] = []
        self._costs: dict[Config, float] = {}  # the next window's candidates, as they are answered
        self._metrics: dict[str, float] = {}
        self.client_devices = list(client_devices) if client_devices is not None else None
        self.device_memory_gb = dict(device_memory_gb or {})
        self.round_budget_s = round_budget_s
        self.per_client_depth = per_client_depth
        self._depth_costs: dict[Config, list[CandidateCost]] = {}  # a fleet's train depths per configuration
        self._train_depth: dict[int, int] = {}  # this round's clients' train depths (a fleet)
        self._sent: TrainableState = {}  # this round's global state (what untrained adapters must still equal)
        self._global: TrainableState = {}  # the global state as this strategy last made it
        self._fleet_metrics: dict[str, float] = {}

    def use_aggregator(self, aggregator: Any) -> None:
        if aggregator.private:
            raise ValueError(
                f"federation.aggregator={type(aggregator).__name__} does not work with ProgressiveUpgrade: trial "
                f"groups are not a uniform sample of the clients and the candidates are scored on the server, which "
                f"the privacy accountant does not cover; drop one of the two"
            )
        super().use_aggregator(aggregator)

    def use_server_optimizer(self, optimizer: Any) -> None:
        raise ValueError(
            f"federation.server_optimizer={type(optimizer).__name__} does not work with ProgressiveUpgrade: the trial "
            f"groups train different adapter configurations, whose shapes one set of moments cannot follow"
        )

    def combines_parts(self) -> bool:
        return self.client_devices is not None and self.per_client_depth  # per-client depths

    @property
    def groups(self) -> int:
        return len(self.candidates)

    def validate(self, num_clients: int) -> None:
        need = self.groups * self.clients_per_round
        if need > num_clients:
            raise ValueError(
                f"FedAdapter trial groups need {self.groups} x {self.clients_per_round} = {need} distinct clients per "
                f"round but there are {num_clients}; lower federation.clients_per_round, use fewer "
                f"upgrade.candidates or more data.num_clients"
            )
        super().validate(num_clients)  # binds the aggregator to the run's sizes
        if self.client_devices is not None:
            mix = self.group_mix()
            left_out = [d for d, n in mix.items() if n == 0]
            if left_out:
                log.warning(
                    "FedAdapter trial groups of %d clients drawn within device classes get no %s client (its share "
                    "of the fleet rounds to 0): raise federation.clients_per_round to include it",
                    self.clients_per_round,
                    ", ".join(repr(d) for d in left_out),
                )
            for device, per_group in mix.items():
                have = self.client_devices.count(device)
                if per_group * self.groups > have:
                    raise ValueError(
                        f"FedAdapter trial groups drawn within device classes need {self.groups} x {per_group} "
                        f"{device!r} clients per round but the fleet has {have}; lower "
                        f"federation.clients_per_round or use fewer upgrade.candidates"
                    )

    def group_mix(self) -> dict[str, int]:
        """On a fleet: how many clients of each device class every trial group gets (the fleet's shares)."""
        assert self.client_devices is not None
        counts = {d: self.client_devices.count(d) for d in dict.fromkeys(self.client_devices)}
        total = len(self.client_devices)
        return largest_remainder({d: n / total for d, n in counts.items()}, self.clients_per_round)

    # -- windows ------------------------------------------------------------------------------------------
    def initialize(self, global_state: TrainableState) -> None:
        self._global = global_state
        if not self.trials and not self._pending:  # a resumed run keeps the checkpoint's window
            self._open_window(global_state)

    def candidate_configs(self) -> list[tuple[str, Config]]:
        """The next window's candidates (name and configuration) from the current configuration."""
        d, w = self.config
        configs: list[tuple[str, Config]] = []
        for name in self.candidates:
            cfg = {"shallow": (d, w), "deeper": (d + self.depth_step, w), "wider": (d, w + self.width_step)}[name]
            if name == "wider" and d == 0:
                continue  # no adapter at depth 0: a wider one would be the same model
            if cfg[0] <= self.num_layers and cfg[1] <= self.max_width and cfg not in [c for _, c in configs]:
                configs.append((name, cfg))
        return configs

    def budget_s(self) -> float:
        """The window's simulated time budget per group: ``T0 * (4 d + 1)``."""
        assert self.window_s is not None, "T0 is known once the starting configuration's cost is"
        return self.window_s * (4 * self.config[0] + 1)

    def _open_window(self, state: TrainableState) -> None:
        """Start a decision window from the global ``state``: ask what planning it needs."""
        self.trials, self.phase, self.results, self._costs = [], 0, {}, {}
        self.window_start_state = {k: v.clone() for k, v in state.items()}
        cost = RoundCost if self.client_devices is None else DepthCosts
        if self.window_s is None:
            self._pending.append(cost(self.start))
        self._pending.extend(cost(cfg) for _, cfg in self.candidate_configs())
        if self.start_acc is None:
            self._pending.append(EvaluateState(self.window_start_state, "start"))

    def _plan_window(self) -> None:
        budget = self.budget_s()
        self.trials = [
            Trial(name, cfg[0], cfg[1], self._costs[cfg], max(1, math.floor(budget / self._costs[cfg])))
            for name, cfg in self.candidate_configs()
        ]
        log.info(
            "FedAdapter window %d from (d=%d, w=%d), budget %.1fs: %s",
            self.window,
            *self.config,
            budget,
            ", ".join(f"{t.name}({t.depth},{t.width}) x{t.rounds}" for t in self.trials),
        )

    # -- configure: which group trains this round ---------------------------------------------------------
    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        self.validate(num_clients)
        if not self.trials:
            raise RuntimeError("TrialGroupStrategy: the window's queries must be answered before its first round")
        trial = self.trials[self.phase]
        # The groups of one window run side by side on real devices: round j of every group draws from
        # the same sample of groups x clients_per_group clients, group k taking the k-th slice.
        need = self.groups * self.clients_per_round
        gen = torch.Generator().manual_seed(derived_seed(self.seed, self.window, trial.done))
        k = self.phase
        if self.client_devices is None:
            chosen = torch.randperm(num_clients, generator=gen)[:need].tolist()
            clients = sorted(chosen[k * self.clients_per_round : (k + 1) * self.clients_per_round])
        else:  # within device classes: group k takes the k-th slice of every class's sample
            clients = []
            for device, per_group in self.group_mix().items():
                members = [c for c, d in enumerate(self.client_devices) if d == device]
                drawn = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
                clients += drawn[k * per_group : (k + 1) * per_group]
            clients.sort()
        told = {"adapter_depth": trial.depth, "adapter_width": trial.width, "decided_depth": self.config[0]}
        plan = RoundPlan(round=round_idx, client_ids=clients, instructions={c: dict(told) for c in clients})
        self._train_depth, self._sent = {}, {}
        if self.client_devices is not None and self.per_client_depth and trial.depth > 0:
            self._sent = self._global
            candidates = self._depth_costs[(trial.depth, trial.width)]
            devices = {c: self.client_devices[c] for c in clients}
            budget = assign(candidates, devices, self.device_memory_gb, self.round_budget_s)
            for c in clients:
                self._train_depth[c] = candidates[budget.choice[c]].size
                plan.instructions[c]["train_depth"] = self._train_depth[c]
            depths = list(self._train_depth.values())
            self._fleet_metrics = {
                "mean_train_depth": sum(depths) / len(depths),
                "min_train_depth": float(min(depths)),
            } | budget.metrics()
        return plan

    def _held(self, client_id: int, state: TrainableState) -> dict[str, torch.Tensor]:
        """The adapters a fleet client did not train (below its top ``train_depth``) as all-False masks."""
        depth = self._train_depth.get(client_id)
        if depth is None:
            return {}
        layers = sorted({layer for k in state if "adapter" in k and (layer := layer_of(k)) is not None})
        below = set(layers[: len(layers) - depth])
        return {k: torch.zeros((), dtype=torch.bool) for k in state if "adapter" in k and layer_of(k) in below}

    def check_update(self, update: ClientUpdate) -> str | None:
        if self._sent and (name := changed_outside(update.state, self._sent, self._held(update.client_id, self._sent))):
            return f"{name} changed, below the top {self._train_depth[update.client_id]} adapters it trains"
        return super().check_update(update)

    def transfer_share(self, client_id: int) -> float:
        if not self._sent or client_id not in self._train_depth:
            return 1.0
        return held_share(self._sent, self._held(client_id, self._sent))

    def download_share(self, client_id: int) -> float:
        # A client below the trial's depth still runs the adapters it does not train forward, and others
        # trained them last round: it needs the trial's whole state, and sends back only its top.
        return 1.0

    # -- aggregate: average; at the end of a trial, score it, then grow the next or decide ----------------
    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        trial = self.trials[self.phase]
        held = [self._held(u.client_id, global_state) for u in updates]
        held = held if any(held) else None  # every client trained every adapter: the plain rule, bit for bit
        new_state = self.combine(round_idx, global_state, updates, held)
        self._global = new_state
        trial.done += 1
        self._metrics = {
            "window": float(self.window),
            "trial_depth": float(trial.depth),
            "trial_width": float(trial.width),
        } | self._fleet_metrics
        self._fleet_metrics = {}
        if trial.done == trial.rounds:
            self.results[self.phase] = new_state
            self._pending.append(EvaluateState(new_state, "trial"))
        return new_state

    def advance_clock(self, round_s: float) -> None:
        # The groups run side by side: the clock is the window's start plus the time this group has run.
        trial = self.trials[self.phase]
        trial.elapsed_s += round_s if round_s > 0 else trial.cost_s
        self.sim_time_s = self.window_start_s + trial.elapsed_s

    def queries(self) -> list[Query]:
        return list(self._pending)

    def answer(self, query: Query, value: Any) -> TrainableState | None:
        self._pending.remove(query)
        if isinstance(query, DepthCosts):
            self._depth_costs[query.config] = [
                CandidateCost(int(c["depth"]), dict(c["seconds"]), int(c["memory_bytes"])) for c in value
            ]
            value = self._fleet_round_s(query.config)
        if isinstance(query, RoundCost | DepthCosts):
            if self.window_s is None and query.config == self.start:
                self.window_s = self.window_rounds * float(value)
            self._costs[query.config] = float(value)
            if not any(isinstance(q, RoundCost | DepthCosts) for q in self._pending):
                self._plan_window()
            return None
        if isinstance(query, GrowState):
            self._global = value
            return value
        if not isinstance(query, EvaluateState):
            return super().answer(query, value)
        if query.purpose == "start":
            self.start_acc = float(value)
            return None
        self.trials[self.phase].val_acc = float(value)
        self.phase += 1
        if self.phase < len(self.trials):  # the next group starts from the window's model, grown to its config
            nxt = self.trials[self.phase]
            assert self.window_start_state is not None
            self._pending.append(GrowState(self.window_start_state, (nxt.depth, nxt.width)))
            return None
        self._global = self._decide()
        return self._global

    def _fleet_round_s(self, config: Config) -> float:
        """A configuration's predicted round time on the fleet: every client of the fleet at its budget."""
        assert self.client_devices is not None
        candidates = self._depth_costs[config]
        if not self.per_client_depth:  # everyone at the configuration: the slowest device sets the pace
            return max(candidates[0].seconds[d] for d in set(self.client_devices))
        devices = dict(enumerate(self.client_devices))
        return assign(candidates, devices, self.device_memory_gb, self.round_budget_s).assigned_s

    def _decide(self) -> TrainableState:
        # Highest validation accuracy wins; on a tie the earlier (cheaper: shallow first) candidate.
        best = max(range(len(self.trials)), key=lambda k: (self.trials[k].val_acc, -k))
        winner = self.trials[best]
        start_acc = float(self.start_acc if self.start_acc is not None else float("nan"))
        self.window_start_s += winner.elapsed_s
        self.sim_time_s = self.window_start_s
        decision = Decision(
            window=self.window,
            start_depth=self.config[0],
            start_width=self.config[1],
            budget_s=self.budget_s(),
            start_acc=start_acc,
            trials="; ".join(f"{t.name}({t.depth},{t.width}): {t.done} rounds -> {t.val_acc:.4f}" for t in self.trials),
            winner=winner.name,
            depth=winner.depth,
            width=winner.width,
            val_acc=float(winner.val_acc),
            gain=float(winner.val_acc) - start_acc,
            sim_time_h=self.window_start_s / 3600.0,
        )
        self.decisions.append(decision)
        self.config = (winner.depth, winner.width)
        log.info(
            "FedAdapter window %d: %s wins -> (d=%d, w=%d), val_acc %.4f",
            self.window,
            winner.name,
            *self.config,
            winner.val_acc,
        )
        self._metrics["decision_val_acc"] = float(winner.val_acc)
        state = self.results[best]
        self.start_acc = float(winner.val_acc)
        self.window += 1
        self._open_window(state)
        return state

    def round_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return super().round_metrics() | metrics

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"decisions": [asdict(d) for d in self.decisions]}

    def may_stop(self) -> bool:
        # Only at a window's end: the clock then is the decided one, and no trial is left half done. A
        # decision opens the next window at once, so "just decided" is "no trial of this window ran yet".
        return self.phase == 0 and not any(t.done for t in self.trials)

    # -- checkpointing (between rounds, when no query is open) ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "config": list(self.config),
            "window_s": self.window_s,
            "window": self.window,
            "phase": self.phase,
            "window_start_s": self.window_start_s,
            "start_acc": self.start_acc,
            "trials": [asdict(t) for t in self.trials],
            "window_start_state": self.window_start_state,
            "results": self.results,
            "decisions": [asdict(d) for d in self.decisions],
            "depth_costs": {cfg: [asdict(c) for c in cs] for cfg, cs in self._depth_costs.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.config = tuple(state["config"])  # type: ignore[assignment]
        self.window_s = state["window_s"]
        self.window = int(state["window"])
        self.phase = int(state["phase"])
        self.window_start_s = float(state["window_start_s"])
        self.start_acc = state["start_acc"]
        self.trials = [Trial(**t) for t in state["trials"]]
        self.window_start_state = state["window_start_state"]
        self.results = dict(state["results"])
        self.decisions = [Decision(**d) for d in state["decisions"]]
        self._depth_costs = {
            tuple(cfg): [CandidateCost(**c) for c in cs] for cfg, cs in state.get("depth_costs", {}).items()
        }
        self._pending = []
