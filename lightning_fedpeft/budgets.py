"""Per-client budgets on a fleet: the largest configuration that fits a client's memory and the round's time.

Plain Python, shared by every algorithm that hands clients configurations of their own (FedARA's nested
prefixes today). An algorithm lists its candidate configurations from the largest (the global one) down,
and for each the answer to "what would it cost" on the server's process: the predicted round seconds on
every device profile of the fleet and the counted training memory (:class:`CandidateCost`). Each round,
:func:`assign` gives every participant the largest candidate whose memory fits its device and whose time
fits the round's budget: ``round_budget_s`` if set, else the median participant's time at the global
configuration, so the slower half of the round trains less and the round ends when the median would have.
A client whose device fits no candidate within the time gets the smallest that fits its memory (the run
refused, before training, a device that fits none).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CandidateCost:
    """What one candidate configuration costs: predicted round seconds per device profile, counted memory."""

    size: int  # what the algorithm calls the configuration's size (FedARA: triplets)
    seconds: Mapping[str, float]
    memory_bytes: int


@dataclass(frozen=True)
class Assignment:
    """One round's budgets: each participant's candidate index, the time budget, and what it saves."""

    choice: dict[int, int]  # client -> index into the candidates (0: the global configuration)
    budget_s: float
    uniform_s: float  # predicted round time had every participant trained the global configuration
    assigned_s: float  # predicted round time with the assigned configurations

    def metrics(self) -> dict[str, float]:
        """The round's predicted times, as its row in ``rounds.csv`` logs them."""
        return {
            "pred_round_s": self.assigned_s,
            "pred_uniform_round_s": self.uniform_s,
            "pred_saved_s": self.uniform_s - self.assigned_s,
        }


def assign(
    candidates: Sequence[CandidateCost],
    devices: Mapping[int, str],
    memory_gb: Mapping[str, float | None],
    round_budget_s: float | None = None,
) -> Assignment:
    """Each client of ``devices`` (client -> profile name) gets a candidate; see the module docstring."""
    if not candidates:
        raise ValueError("assign needs at least one candidate configuration")

    def fits(index: int, device: str) -> bool:
        limit = memory_gb.get(device)
        return limit is None or candidates[index].memory_bytes <= limit * 1e9

    full = {cid: candidates[0].seconds[dev] for cid, dev in devices.items()}
    budget = round_budget_s if round_budget_s is not None else statistics.median(full.values())
    choice: dict[int, int] = {}
    for cid, dev in devices.items():
        roomy = [i for i in range(len(candidates)) if fits(i, dev)]
        if not roomy:
            raise ValueError(f"client {cid}'s device {dev!r} fits no configuration in memory")
        timely = [i for i in roomy if candidates[i].seconds[dev] <= budget]
        choice[cid] = timely[0] if timely else roomy[-1]
    assigned = max(candidates[i].seconds[devices[cid]] for cid, i in choice.items())
    return Assignment(choice, float(budget), max(full.values()), float(assigned))
