"""Laying out a round's local training as one stream of batches.

In the one-process simulator a Lightning training epoch is one federated round: the batches of the
sampled clients follow each other (client 3's local steps, then client 17's, ...) and ``RoundSync``
swaps the trainable state at each client boundary. :class:`RoundBatchSampler` produces that stream and
tells where each client's segment starts and ends; :class:`LocalRound` follows it as it is trained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from lightning_fedpeft.protocol import ClientContext, ClientResult, ClientUpdate, RoundTicket, TrainableState
from lightning_fedpeft.seeds import derived_seed


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
    return derived_seed(seed, round_idx, client_id) % (2**63 - 1)


def check_local_work(local_epochs: Any, local_steps: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``local_epochs`` is an int >= 1 and ``local_steps`` one too, or ``None``."""
    for key, value, optional in (("local_epochs", local_epochs, False), ("local_steps", local_steps, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = " (or null to use local_epochs)" if optional else ""
            raise ValueError(f"{where}{key}={value!r} must be an int >= 1{hint}")


# Length bucketing sorts the examples of this many batches' worth of a shuffled pass by length: long enough
# runs for batches of similar lengths, short enough that each batch still draws from a random part of the pass.
BUCKET_BATCHES = 16


def client_batches(
    indices: Sequence[int],
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    generator: torch.Generator | None = None,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """One client's local batches: ``local_epochs`` shuffled passes, or exactly ``local_steps`` batches.

    With ``local_steps`` the client cycles through reshuffled passes until it has that many batches; the
    last batch of a pass may be smaller than ``batch_size`` (nothing is dropped). With ``lengths`` (every
    example's token count, indexed like the dataset) each pass is bucketed: see :func:`bucket_by_length`.
    """
    if not indices:
        return []
    batches: list[list[int]] = []
    passes = 0
    while True:
        perm = torch.randperm(len(indices), generator=generator).tolist()
        order = [indices[i] for i in perm]
        if lengths is not None:
            chunks = bucket_by_length(order, batch_size, lengths, generator)
        else:
            chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        for chunk in chunks:
            batches.append(chunk)
            if local_steps is not None and len(batches) == local_steps:
                return batches
        passes += 1
        if local_steps is None and passes == local_epochs:
            return batches


def bucket_by_length(
    order: Sequence[int], batch_size: int, lengths: Sequence[int], generator: torch.Generator | None
) -> list[list[int]]:
    """Batches of similar lengths from one shuffled pass ``order``: every ``BUCKET_BATCHES`` batches' worth of
    it sorted by length (longest first) and cut into batches, then all of the pass's batches shuffled.

    A batch is padded to its longest row, so batches of similar lengths pad less (fewer tokens computed for
    nothing); each example still comes once per pass, and the loss of a row does not depend on its padding.
    """
    span = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        run = sorted(order[start : start + span], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches.extend(run[b : b + batch_size] for b in range(0, len(run), batch_size))
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


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
        instructions: per client, what the round's plan told it; ``local_steps`` and ``local_epochs`` there
            override the two settings above for that client.
        lengths: every example's token count, to bucket each client's batches by length (None: off).
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
        instructions: Mapping[int, Mapping[str, Any]] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.batches: list[list[int]] = []
        self.segments: list[ClientSegment] = []
        for cid in client_ids:
            told = (instructions or {}).get(cid, {})
            epochs, steps = told.get("local_epochs", local_epochs), told.get("local_steps", local_steps)
            if "local_epochs" in told and "local_steps" not in told:
                steps = None  # an instructed number of passes is not capped by the run's local_steps
            check_local_work(epochs, steps, f"round {round_idx}: client {cid}'s instruction ")
            # One generator per (seed, round, client): a client's batches do not depend on which other
            # clients share its process, so a multi-rank run trains exactly what the simulator trains.
            gen = torch.Generator().manual_seed(client_seed(seed, round_idx, cid))
            batches = client_batches(list(client_indices[cid]), batch_size, epochs, steps, gen, lengths)
            if not batches:
                continue  # an empty client has nothing to contribute
            self.segments.append(ClientSegment(cid, len(client_indices[cid]), len(self.batches), len(batches)))
            self.batches.extend(batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LocalRound:
    """One round as this process trains it: its ticket, where each client's batches start and end, and the
    client in training (its context, its losses, its simulated compute)."""

    def __init__(self, ticket: RoundTicket, sampler: RoundBatchSampler) -> None:
        assert sampler.segments, "a round without a client with data has nothing to follow"
        self.ticket = ticket
        self.opened_at = time.perf_counter()
        self._starts = {s.first_batch: s for s in sampler.segments}
        self._ends = {s.last_batch for s in sampler.segments}
        self.last_batch = max(self._ends)
        self.client: ClientContext | None = None
        self.losses: list[float] = []  # every local step's loss so far
        self._client_losses: list[torch.Tensor] = []  # on the training device until the client ends
        self._client_sim_s = 0.0

    def start_client(self, batch_idx: int) -> ClientContext | None:
        """If a client's segment starts at ``batch_idx``, make it the client in training and return its context."""
        segment = self._starts.get(batch_idx)
        if segment is None:
            return None
        ticket = self.ticket
        told = ticket.instructions.get(segment.client_id, {})
        self.client = ClientContext(ticket.round, segment.client_id, segment.num_examples, told, ticket.global_state)
        self._client_losses, self._client_sim_s = [], 0.0
        return self.client

    def ends_client(self, batch_idx: int) -> bool:
        return batch_idx in self._ends

    def record_step(self, loss: torch.Tensor | float | None, sim_s: float = 0.0) -> None:
        """One local step of the client in training: its loss and simulated device seconds.

        The loss is kept as it comes (a tensor on the GPU, say) and read once, when the client ends: reading
        it every step would make the host wait for the device at every step.
        """
        if loss is not None:
            self._client_losses.append(
                loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(loss, dtype=torch.float64)
            )
        self._client_sim_s += sim_s

    def _read_losses(self) -> list[float]:
        """The client's step losses as floats, with one transfer from the device."""
        steps = self._client_losses
        if not steps:
            return []
        return torch.stack([t.reshape(()).to(steps[-1].device, torch.float64) for t in steps]).tolist()

    def finish_client(self, state: TrainableState, results: Sequence[ClientResult], simulated: bool) -> ClientUpdate:
        """The update of the client in training, from its trainable ``state`` and its algorithms' results."""
        ctx = self.client
        assert ctx is not None, "no client in training"
        losses = self._read_losses()
        metrics = {"train_loss": sum(losses) / len(losses)} if losses else {}
        self.losses.extend(losses)
        tensors: TrainableState = {}
        for result in results:
            tensors |= result.tensors
            metrics |= result.metrics
        if simulated:
            metrics["sim_compute_s"] = self._client_sim_s
        self.client = None
        return ClientUpdate(ctx.client_id, ctx.round, ctx.num_examples, state, metrics, tensors)
