"""Heterogeneous LoRA's server half: each client trains the first ``r_c`` ranks of the global LoRA factors.

The global state holds every LoRA module at the fleet's largest rank ``r``; a client of rank ``r_c`` trains
the first ``r_c`` rows of ``A`` (``r x in``) and columns of ``B`` (``out x r``), and sends the rest back as it
got them (checked). Two rules turn the round's updates into the next global state:

* ``zero_pad`` (HetLoRA, Cho et al., 2023, as the baseline): every client's factors are padded with zeros to
  rank ``r`` and averaged by samples over all the round's clients, so a rank held by few clients is pulled
  towards zero by the others;
* ``per_coordinate`` (ours, the default): every coordinate is averaged by samples over the clients that
  trained it, so nothing is pulled towards zero; a rank nobody trained keeps its value.

FlexLoRA's rule (average the products ``B A`` and give each client the truncated SVD back) is not offered:
it is not linear in the updates, so neither DP noise nor the robust aggregators could be combined with it,
and it re-mixes the ranks every round, where the nested prefixes of this rule keep rank ``i`` the same
direction for every client (docs/fleet.md). Plain torch: the client half is in :mod:`.client`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_fedpeft.aggregation import changed_outside, held_share
from lightning_fedpeft.protocol import ClientUpdate, RoundPlan, TrainableState
from lightning_fedpeft.strategy import FedAvg

LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"
RULES = ("per_coordinate", "zero_pad")


def lora_modules(state: TrainableState) -> list[str]:
    """The LoRA modules whose factors ``state`` carries (names without the factor suffix)."""
    return [k[: -len(LORA_A)] for k in state if k.endswith(LORA_A) and k[: -len(LORA_A)] + LORA_B in state]


def rank_masks(state: TrainableState, rank: int) -> dict[str, torch.Tensor]:
    """The coordinates a client of ``rank`` trains: the first ``rank`` rows of A and columns of B."""
    masks: dict[str, torch.Tensor] = {}
    for module in lora_modules(state):
        a, b = state[module + LORA_A], state[module + LORA_B]
        masks[module + LORA_A] = (torch.arange(a.shape[0]) < rank).reshape(-1, 1)
        masks[module + LORA_B] = (torch.arange(b.shape[1]) < rank).reshape(1, -1)
    return masks


class HeteroLoRAStrategy(FedAvg):
    """Sample-weighted FedAvg over LoRA factors of per-client ranks (see the module docstring).

    Args:
        clients_per_round: participants per round.
        client_ranks: every client's rank, client 0 first.
        rule: ``per_coordinate`` or ``zero_pad``.
        seed: seeds the choice of participants.
    """

    def __init__(
        self, clients_per_round: int, client_ranks: Sequence[int], rule: str = "per_coordinate", seed: int = 0
    ):
        super().__init__(clients_per_round, seed=seed)
        if rule not in RULES:
            raise ValueError(f"hetero_lora.rule={rule!r} must be one of {', '.join(RULES)}")
        self.client_ranks = [int(r) for r in client_ranks]
        self.rule = rule
        self._global: TrainableState = {}
        self._round_ranks: list[int] = []

    def validate(self, num_clients: int) -> None:
        super().validate(num_clients)
        if len(self.client_ranks) != num_clients:
            raise ValueError(
                f"HeteroLoRAStrategy got ranks for {len(self.client_ranks)} clients, the run has {num_clients}"
            )

    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        plan = super().configure_round(round_idx, num_clients)
        plan.instructions = {cid: {"lora_rank": self.client_ranks[cid]} for cid in plan.client_ids}
        return plan

    def check_update(self, update: ClientUpdate) -> str | None:
        # What a client does not train it sends back unchanged: anything else is a client that trained
        # (or was built with) another rank than it was told.
        if not self._global:
            return None
        rank = self.client_ranks[update.client_id]
        name = changed_outside(update.state, self._global, rank_masks(self._global, rank))
        if name is not None:
            return f"{name} changed beyond the first {rank} ranks this client was told to train"
        return None

    def transfer_share(self, client_id: int) -> float:
        if not self._global:
            return 1.0
        return held_share(self._global, rank_masks(self._global, self.client_ranks[client_id]))

    def initialize(self, global_state: TrainableState) -> None:
        self._global = {k: v.clone() for k, v in global_state.items()}
        if not lora_modules(global_state):
            raise ValueError("HeterogeneousLoRA needs LoRA layers in the trainable state: set model.method='lora'")

    def combines_parts(self) -> bool:
        return self.rule != "zero_pad"  # zero-padding hands the aggregator whole states

    def aggregate(
        self, round_idx: int, global_state: TrainableState, updates: Sequence[ClientUpdate]
    ) -> TrainableState:
        held = [rank_masks(global_state, self.client_ranks[u.client_id]) for u in updates]
        self._round_ranks = [self.client_ranks[u.client_id] for u in updates]
        if self.rule == "zero_pad":
            padded = [_zero_padded(u, masks) for u, masks in zip(updates, held, strict=True)]
            out = self.combine(round_idx, global_state, padded)
        else:
            out = self.combine(round_idx, global_state, updates, held)
        self._global = {k: v.clone() for k, v in out.items()}
        return out

    def round_metrics(self) -> dict[str, float]:
        ranks = self._round_ranks
        return super().round_metrics() | ({"mean_client_rank": sum(ranks) / len(ranks)} if ranks else {})


def _zero_padded(update: ClientUpdate, masks: dict[str, torch.Tensor]) -> ClientUpdate:
    state = dict(update.state)
    for name, mask in masks.items():
        state[name] = torch.where(mask, state[name], torch.zeros((), dtype=state[name].dtype))
    return ClientUpdate(update.client_id, update.round, update.num_examples, state, update.metrics, update.tensors)
