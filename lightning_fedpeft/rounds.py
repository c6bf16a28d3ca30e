"""Laying out a round's local training as one stream of batches.

In the one-process simulator a Lightning training epoch is one federated round: the batches of the
sampled clients follow each other (client 3's local steps, then client 17's, ...) and ``RoundSync``
swaps the trainable state at each client boundary. :class:`RoundBatchSampler` produces that stream and
tells where each client's segment starts and ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class ClientSegment:
    """The contiguous run of batches in which one client trains during a round."""

    client_id: int
    num_examples: int
    first_batch: int
    num_batches: int

    @property
    def last_batch(self) -> int:
        return self.first_batch + self.num_batches - 1


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """A seed for one client's work in one round (its batch order and its dropout)."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_id) % (2**63 - 1)


def client_batches(
    indices: Sequence[int],
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """One client's local batches: ``local_epochs`` shuffled passes, or exactly ``local_steps`` batches.

    With ``local_steps`` the client cycles through reshuffled passes until it has that many batches; the
    last batch of a pass may be smaller than ``batch_size`` (nothing is dropped).
    """
    if not indices:
        return []
    batches: list[list[int]] = []
    passes = 0
    while True:
        perm = torch.randperm(len(indices), generator=generator).tolist()
        order = [indices[i] for i in perm]
        for start in range(0, len(order), batch_size):
            batches.append(order[start : start + batch_size])
            if local_steps is not None and len(batches) == local_steps:
                return batches
        passes += 1
        if local_steps is None and passes == local_epochs:
            return batches


class RoundBatchSampler(Sampler[list[int]]):
    """Batches of every participating client of one round, client after client.

    Args:
        client_indices: every client's example indices (into the training dataset).
        client_ids: the round's participants, in training order.
        batch_size: local batch size.
        local_epochs: passes over its data each client makes (ignored when ``local_steps`` is set).
        local_steps: if set, the exact number of local steps per client.
        seed: with ``round_idx``, seeds the local shuffles so a round is reproducible.
        round_idx: the round these batches belong to.
    """

    def __init__(
        self,
        client_indices: Sequence[Sequence[int]],
        client_ids: Sequence[int],
        batch_size: int,
        local_epochs: int = 1,
        local_steps: int | None = None,
        seed: int = 0,
        round_idx: int = 0,
    ) -> None:
        self.batches: list[list[int]] = []
        self.segments: list[ClientSegment] = []
        for cid in client_ids:
            # One generator per (seed, round, client): a client's batches do not depend on which other
            # clients share its process, so a multi-rank run trains exactly what the simulator trains.
            gen = torch.Generator().manual_seed(client_seed(seed, round_idx, cid))
            batches = client_batches(list(client_indices[cid]), batch_size, local_epochs, local_steps, gen)
            if not batches:
                continue  # an empty client has nothing to contribute
            self.segments.append(ClientSegment(cid, len(client_indices[cid]), len(self.batches), len(batches)))
            self.batches.extend(batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
