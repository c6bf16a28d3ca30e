"""How the server combines client updates, and how it steps from the result: plugins of a strategy.

Chosen in YAML as ``federation.aggregator`` and ``federation.server_optimizer`` (``class_path`` +
``init_args``); RoundSync hands them to the run's strategy, which takes them or refuses the combination
with the reason (FedARA's masks and FedAdapter's trial groups change the state's shapes between rounds,
which a server optimizer's moments cannot follow). Plain torch: no Lightning, no model. Every rule
works on the clients' states in client-id order, accumulates in float64 and returns the global state's
dtypes; everything random is seeded from (seed, round).

Aggregators (the combination):

* :class:`WeightedMean`: FedAvg's sample-weighted mean (the default).
* :class:`CoordinateMedian`: the median of every coordinate over the clients (Yin et al., 2018).
* :class:`TrimmedMean`: every coordinate's mean after dropping its ``trim`` largest and smallest
  values (Yin et al., 2018).
* :class:`NormBounded`: each client's change from the global state clipped to an L2 norm, then the
  sample-weighted mean (Sun et al., 2019).
* :class:`DPGaussian`: client-level differential privacy (DP-FedAvg, McMahan et al., 2018): each
  client's change clipped to ``clip_norm``, the unweighted mean over the round's ``clients_per_round``,
  plus Gaussian noise of standard deviation ``noise_multiplier * clip_norm / clients_per_round``; the
  privacy spent is accounted with Opacus' RDP accountant (sampling rate = clients per round / clients).

Heterogeneous clients (a fleet where each client trains part of the state: a LoRA rank of its own, a prefix
of FedARA's triplets) pass ``held``: per update, a boolean mask per tensor of the coordinates that client
trained (a tensor not named is held whole). Every rule then works per coordinate over the clients that hold
it, with the counts public (they follow from the plan, not from the data): the weighted mean divides by the
holders' weight, the median and trimmed mean take the holders' values, the clipped rules sum the holders'
clipped changes and divide by their number (DPGaussian: the noise of the sum, ``noise_multiplier x clip_norm``,
over that number too, so each coordinate keeps the same mechanism). A coordinate nobody holds keeps its
global value.

Server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization"), on the pseudo-gradient
``Δ = combined - global``: :class:`FedAvgM` (momentum), :class:`FedAdam`, :class:`FedYogi`,
:class:`FedAdagrad`. As in the paper and Flower, without bias correction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedpeft.protocol import ClientUpdate, TrainableState
from lightning_fedpeft.seeds import SEED_SCALE, derived_seed

log = logging.getLogger(__name__)

Held = Sequence[Mapping[str, torch.Tensor]] | None  # per update: name -> bool mask of the coordinates it trained


class Aggregator:
    """How a round's accepted updates become the combined state (before any server optimizer)."""

    private = False  # adds noise for differential privacy (strategies may refuse it)

    def bind(self, clients_per_round: int, num_clients: int, seed: int) -> None:
        """The run's sizes and seed, before the first round."""
        self.clients_per_round, self.num_clients, self.seed = clients_per_round, num_clients, seed

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        """The combined state; ``held`` (see the module docstring) limits each client to its coordinates."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Numbers to log with the round just combined."""
        return {}

    def stop_reason(self) -> str | None:
        """Why the run must end after this round (a privacy budget spent), or ``None``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""


def held_mask(held: Held, index: int, name: str, ref: torch.Tensor) -> torch.Tensor | None:
    """Update ``index``'s mask for tensor ``name`` as float64 of ``ref``'s shape, or ``None`` (held whole)."""
    if held is None or name not in held[index]:
        return None
    return held[index][name].to(torch.float64).expand(ref.shape)


def held_share(state: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor]) -> float:
    """The share of ``state``'s elements that one client's ``held`` masks mark (tensors not named count whole)."""
    total = sum(t.numel() for t in state.values())
    kept = sum(int(held[k].expand(t.shape).sum()) if k in held else t.numel() for k, t in state.items())
    return kept / total if total else 1.0


def changed_outside(
    state: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor]
) -> str | None:
    """The first tensor of ``state`` that differs from ``sent`` outside the coordinates ``held`` marks, or ``None``:
    what a client does not train it must send back as it got it."""
    for name, mask in held.items():
        outside = ~mask.expand(sent[name].shape)
        if not torch.equal(state[name][outside], sent[name][outside]):
            return name
    return None


def _holders(held: Held, name: str, ref: torch.Tensor, count: int) -> torch.Tensor:
    """``(count, *ref.shape)`` float64 0/1: which update holds which coordinate of ``name``."""
    ones = torch.ones(ref.shape, dtype=torch.float64)
    return torch.stack([m if (m := held_mask(held, i, name, ref)) is not None else ones for i in range(count)])


def _weights(updates: Sequence[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("the updates hold no example to weight them by")
    return [u.num_examples / total for u in updates]


class WeightedMean(Aggregator):
    """FedAvg: ``sum_k n_k w_k / sum_k n_k`` over the trainable state (float64 accumulation)."""

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        weights = _weights(updates)
        out: TrainableState = {}
        for name, ref in global_state.items():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            if held is None:
                for u, weight in zip(updates, weights, strict=True):
                    acc += u.state[name].to(torch.float64) * weight
                out[name] = acc.to(ref.dtype)
                continue
            mass = torch.zeros_like(acc)
            for i, (u, weight) in enumerate(zip(updates, weights, strict=True)):
                mask = held_mask(held, i, name, ref)
                share = weight if mask is None else mask * weight
                acc += u.state[name].to(torch.float64) * share
                mass += share
            out[name] = torch.where(mass > 0, acc / mass.clamp_min(1e-300), ref.to(torch.float64)).to(ref.dtype)
        return out


def _stacked(name: str, updates: Sequence[ClientUpdate]) -> torch.Tensor:
    return torch.stack([u.state[name].to(torch.float64) for u in updates])


class CoordinateMedian(Aggregator):
    """The coordinate-wise median over the clients (unweighted; the mean of the two middle values when
    their number is even, so the result does not depend on the clients' order)."""

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        out: TrainableState = {}
        for name, ref in global_state.items():
            if held is not None:
                values, count = _held_sorted(name, ref, updates, held)
                low = values.gather(0, ((count - 1) // 2).clamp_min(0).unsqueeze(0)).squeeze(0)
                high = values.gather(0, (count // 2).clamp_max(len(updates) - 1).unsqueeze(0)).squeeze(0)
                middle = torch.where(count > 0, (low + high) / 2, ref.to(torch.float64))
                out[name] = middle.to(ref.dtype)
                continue
            values = _stacked(name, updates).sort(dim=0).values
            k = len(updates)
            middle = values[k // 2] if k % 2 else (values[k // 2 - 1] + values[k // 2]) / 2
            out[name] = middle.to(ref.dtype)
        return out


def _held_sorted(
    name: str, ref: torch.Tensor, updates: Sequence[ClientUpdate], held: Held
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the holders' values sorted ascending first (the rest after them), and their count."""
    holders = _holders(held, name, ref, len(updates))
    values = torch.where(holders > 0, _stacked(name, updates), torch.inf).sort(dim=0).values
    return values, holders.sum(dim=0).long()


class TrimmedMean(Aggregator):
    """The coordinate-wise mean after dropping the ``trim`` largest and ``trim`` smallest values.

    Args:
        trim: values dropped at each end, per coordinate; tolerates that many poisoned clients a round.
    """

    def __init__(self, trim: int = 1) -> None:
        if trim < 1:
            raise ValueError(f"federation.aggregator.trim={trim} must be at least 1 (0 is the plain mean)")
        self.trim = trim

    def bind(self, clients_per_round: int, num_clients: int, seed: int) -> None:
        super().bind(clients_per_round, num_clients, seed)
        if 2 * self.trim >= clients_per_round:
            raise ValueError(
                f"federation.aggregator.trim={self.trim} drops {2 * self.trim} of the {clients_per_round} clients a "
                f"round sends; lower trim below {clients_per_round / 2:g} or raise federation.clients_per_round"
            )

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        out: TrainableState = {}
        for name, ref in global_state.items():
            if held is not None:
                # Per coordinate over its holders: trim min(trim, (holders - 1) // 2) at each end.
                values, count = _held_sorted(name, ref, updates, held)
                cut = torch.minimum(torch.full_like(count, self.trim), ((count - 1) // 2).clamp_min(0))
                finite = torch.where(torch.isfinite(values), values, 0.0)
                sums = torch.cat([torch.zeros_like(finite[:1]), finite.cumsum(dim=0)])
                kept = (count - 2 * cut).clamp_min(1)
                total = sums.gather(0, (count - cut).unsqueeze(0)).squeeze(0) - sums.gather(
                    0, cut.unsqueeze(0)
                ).squeeze(0)
                out[name] = torch.where(count > 0, total / kept, ref.to(torch.float64)).to(ref.dtype)
                continue
            values = _stacked(name, updates).sort(dim=0).values
            k = min(self.trim, (len(updates) - 1) // 2)  # a round short of clients still keeps one value
            out[name] = values[k : len(updates) - k].mean(dim=0).to(ref.dtype)
        return out


def _clipped_changes(
    global_state: TrainableState, updates: Sequence[ClientUpdate], max_norm: float, held: Held = None
) -> tuple[list[TrainableState], list[float]]:
    """Each update's change from the global state (float64; with ``held``, on its coordinates only), scaled
    down to an L2 norm of ``max_norm``."""
    changes, norms = [], []
    for i, u in enumerate(updates):
        change = {n: u.state[n].to(torch.float64) - ref.to(torch.float64) for n, ref in global_state.items()}
        if held is not None:
            for n, ref in global_state.items():
                if (mask := held_mask(held, i, n, ref)) is not None:
                    change[n] = change[n] * mask
        norm = math.sqrt(sum(float(c.pow(2).sum()) for c in change.values()))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        changes.append({n: c * scale for n, c in change.items()})
        norms.append(norm)
    return changes, norms


class NormBounded(Aggregator):
    """Each client's change from the global state clipped to ``max_norm`` (L2, over the whole state), then
    the sample-weighted mean: one client cannot move the model by more than its share of ``max_norm``."""

    def __init__(self, max_norm: float = 1.0) -> None:
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"federation.aggregator.max_norm={max_norm} must be a positive number")
        self.max_norm = max_norm
        self._clipped = 0.0

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        changes, norms = _clipped_changes(global_state, updates, self.max_norm, held)
        self._clipped = float(sum(norm > self.max_norm for norm in norms))
        out: TrainableState = {}
        for name, ref in global_state.items():
            acc = ref.to(torch.float64).clone()
            if held is None:
                for change, weight in zip(changes, _weights(updates), strict=True):
                    acc += change[name] * weight
                out[name] = acc.to(ref.dtype)
                continue
            step, mass = torch.zeros_like(acc), torch.zeros_like(acc)
            for i, (change, weight) in enumerate(zip(changes, _weights(updates), strict=True)):
                mask = held_mask(held, i, name, ref)
                share = weight if mask is None else mask * weight
                step += change[name] * share
                mass += share
            out[name] = (acc + torch.where(mass > 0, step / mass.clamp_min(1e-300), 0.0)).to(ref.dtype)
        return out

    def metrics(self) -> dict[str, float]:
        return {"clipped_clients": self._clipped}


class DPGaussian(Aggregator):
    """Client-level differential privacy: clip, average over a fixed denominator, add Gaussian noise.

    Args:
        clip_norm: each client's change from the global state is clipped to this L2 norm.
        noise_multiplier: the noise's standard deviation, in units of ``clip_norm / clients_per_round``.
        delta: the delta of the reported (epsilon, delta) guarantee.
        max_epsilon: if set, the budget: with ``on_budget='stop'`` the run ends after the last round that
            keeps epsilon within it; with ``'warn'`` it goes on and logs a warning once.
        on_budget: ``stop`` or ``warn``.

    The accountant assumes each round's participants are a uniform sample (rate clients per round /
    clients), as the default strategy draws them; a strategy that picks otherwise refuses this rule.
    """

    private = True

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        on_budget: str = "stop",
    ) -> None:
        for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"federation.aggregator.{name}={value} must be a positive number")
        if not 0 < delta < 1:
            raise ValueError(f"federation.aggregator.delta={delta} must be within (0, 1), e.g. 1e-5")
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"federation.aggregator.max_epsilon={max_epsilon} must be positive (or unset)")
        if on_budget not in ("stop", "warn"):
            raise ValueError(f"federation.aggregator.on_budget={on_budget!r} must be 'stop' or 'warn'")
        self.clip_norm, self.noise_multiplier, self.delta = clip_norm, noise_multiplier, delta
        self.max_epsilon, self.on_budget = max_epsilon, on_budget
        self.rounds = 0  # noisy rounds so far: with the rate, all the accountant needs
        self._clipped = 0.0
        self._warned = False

    @property
    def sample_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    def epsilon(self, rounds: int | None = None) -> float:
        """The epsilon at ``delta`` after ``rounds`` noisy rounds (default: those done), from Opacus' RDP
        accountant (Mironov et al.'s subsampled Gaussian)."""
        try:
            from opacus.accountants import RDPAccountant
        except ImportError as err:
            raise ValueError(
                "federation.aggregator=DPGaussian accounts privacy with Opacus: `pip install -e '.[privacy]'`"
            ) from err
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, rounds)]
        return float(accountant.get_epsilon(self.delta))

    def bind(self, clients_per_round: int, num_clients: int, seed: int) -> None:
        super().bind(clients_per_round, num_clients, seed)
        self.epsilon(1)  # fails now, not after a round, if the accountant is missing
        if self.max_epsilon is not None and self.on_budget == "stop" and self.epsilon(1) > self.max_epsilon:
            raise ValueError(
                f"federation.aggregator.max_epsilon={self.max_epsilon} is spent by the first round already "
                f"(epsilon {self.epsilon(1):.3g}); raise noise_multiplier or max_epsilon"
            )

    def combine(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate], held: Held = None
    ) -> TrainableState:
        changes, norms = _clipped_changes(global_state, updates, self.clip_norm, held)
        self._clipped = float(sum(norm > self.clip_norm for norm in norms))
        std = self.noise_multiplier * self.clip_norm / self.clients_per_round
        gen = torch.Generator().manual_seed(derived_seed(self.seed, round_idx, 17, scales=(SEED_SCALE, 7_919, 1)))
        out: TrainableState = {}
        for name, ref in global_state.items():
            total = sum((change[name] for change in changes), torch.zeros(ref.shape, dtype=torch.float64))
            noise = torch.randn(ref.shape, generator=gen, dtype=torch.float64) * std
            if held is not None:
                # Per coordinate, the sum's noise (std noise_multiplier * clip) over its public holder count;
                # the sum's sensitivity is still clip_norm, so each coordinate is the same Gaussian mechanism.
                count = _holders(held, name, ref, len(updates)).sum(dim=0)
                noisy = (total + noise * self.clients_per_round) / count.clamp_min(1.0)
                out[name] = (ref.to(torch.float64) + torch.where(count > 0, noisy, 0.0)).to(ref.dtype)
                continue
            # The fixed denominator: the round's planned size, so one client's sensitivity is clip / m.
            out[name] = (ref.to(torch.float64) + total / self.clients_per_round + noise).to(ref.dtype)
        self.rounds += 1
        spent = self.epsilon()
        if self.max_epsilon is not None and spent > self.max_epsilon and not self._warned:
            budget = self.max_epsilon
            log.warning("round %d: epsilon %.3f passed federation.aggregator.max_epsilon=%s", round_idx, spent, budget)
            self._warned = True
        return out

    def stop_reason(self) -> str | None:
        # Stop after the last round that keeps the budget: the next one would pass it.
        if self.max_epsilon is None or self.on_budget != "stop":
            return None
        following = self.epsilon(self.rounds + 1)
        if following <= self.max_epsilon:
            return None
        return (
            f"epsilon {self.epsilon():.3f} at delta {self.delta:g}; one more round would spend {following:.3f}, past "
            f"federation.aggregator.max_epsilon={self.max_epsilon}"
        )

    def metrics(self) -> dict[str, float]:
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.delta, "clipped_clients": self._clipped}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "warned": self._warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds, self._warned = int(state["rounds"]), bool(state["warned"])


class ServerOptimizer:
    """A step on the server from the global state along the pseudo-gradient ``Δ = combined - global``."""

    def __init__(self, lr: float) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"federation.server_optimizer.lr={lr} must be a positive number")
        self.lr = lr
        self.moments: dict[str, dict[str, torch.Tensor]] = {}  # kind -> name -> float64 tensor

    def step(self, global_state: TrainableState, combined: TrainableState) -> TrainableState:
        out: TrainableState = {}
        for name, ref in global_state.items():
            delta = combined[name].to(torch.float64) - ref.to(torch.float64)
            out[name] = (ref.to(torch.float64) + self._direction(name, delta)).to(ref.dtype)
        return out

    def _moment(self, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.moments.setdefault(kind, {}).setdefault(name, torch.zeros_like(like))

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {k: {n: t.clone() for n, t in m.items()} for k, m in self.moments.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments = {k: {n: t.clone() for n, t in m.items()} for k, m in state["moments"].items()}


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019): ``v = momentum * v + Δ``, step ``lr * v`` (lr 1, momentum 0: FedAvg)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"federation.server_optimizer.momentum={momentum} must be within [0, 1)")
        self.momentum = momentum

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        v = self._moment("v", name, delta)
        v.mul_(self.momentum).add_(delta)
        return self.lr * v


class _Adaptive(ServerOptimizer):
    """Reddi et al.'s adaptive server optimizers: ``m = b1 m + (1 - b1) Δ``, step ``lr * m / (sqrt(v) + tau)``."""

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(lr)
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"federation.server_optimizer.{name}={value} must be within [0, 1)")
        if not tau > 0:
            raise ValueError(f"federation.server_optimizer.tau={tau} must be positive (it keeps the step finite)")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def _second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        raise NotImplementedError

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        m = self._moment("m", name, delta)
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = self._moment("v", name, delta)
        self._second_moment(v, delta * delta)
        return self.lr * m / (v.sqrt() + self.tau)


class FedAdam(_Adaptive):
    """``v = b2 v + (1 - b2) Δ²``."""

    def _second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)


class FedYogi(_Adaptive):
    """``v = v - (1 - b2) Δ² sign(v - Δ²)``: v moves towards Δ² by at most ``(1 - b2) Δ²`` a round."""

    def _second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.sub_((1 - self.beta2) * squared * torch.sign(v - squared))


class FedAdagrad(_Adaptive):
    """``v = v + Δ²`` (``beta2`` unused)."""

    def _second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.add_(squared)
