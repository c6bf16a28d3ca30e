"""The training data as RoundSync serves it: the dataset, the loader's settings, one partition per client.

RoundSync takes the batch size, collate function and workers from the data source's own
``train_dataloader()`` and lays out every round's batches itself (:mod:`lightning_fedpeft.rounds`).
The partition comes from the data source (a ``client_indices`` attribute, as on
``FederatedTextDataModule``; a true ``length_bucketing`` attribute there buckets each client's batches by
length), or an IID split over ``num_clients``; in ``mode: real`` every rank is one
client and trains on its own data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fedpeft.protocol import RoundTicket
from lightning_fedpeft.rounds import RoundBatchSampler

log = logging.getLogger(__name__)


class ClientData:
    """The training set split over clients, and the loader settings to serve their batches with.

    :meth:`take_over` builds it from a Trainer's data source; :meth:`serve` then answers that source's
    ``train_dataloader`` (an instance attribute) until :meth:`release`.
    """

    def __init__(
        self,
        base: DataLoader,
        client_indices: Sequence[Sequence[int]],
        source: Any = None,
        length_bucketing: bool = False,
    ) -> None:
        batch_size = base.batch_size if base.batch_size is not None else getattr(base.batch_sampler, "batch_size", None)
        if not batch_size:
            raise ValueError("RoundSync could not tell the training batch size from train_dataloader()")
        self.dataset: Dataset = base.dataset
        self.batch_size = int(batch_size)
        self.client_indices = [list(ix) for ix in client_indices]
        self._loader_kwargs = {
            "collate_fn": base.collate_fn,
            "num_workers": base.num_workers,
            "pin_memory": base.pin_memory,
        }
        self.source = source
        self.lengths: list[int] | None = None  # every example's token count, when batches are bucketed by length
        if length_bucketing:
            lengths = getattr(self.dataset, "lengths", None)
            if not callable(lengths):
                raise ValueError(
                    f"data.length_bucketing needs a dataset that tells its examples' lengths (a lengths() method); "
                    f"{type(self.dataset).__name__} has none"
                )
            self.lengths = list(lengths())

    @classmethod
    def take_over(
        cls, trainer: Any, pl_module: Any, num_clients: int | None, launcher: Any, seed: int, owner: type
    ) -> ClientData:
        """The training data of ``trainer``'s source (DataModule, else LightningModule), split over clients
        (see :func:`client_partition`; ``launcher`` says the mode, rank and world size)."""
        source, base = training_loader(trainer, pl_module, owner)
        indices = getattr(source, "client_indices", None)
        where = (launcher.mode, launcher.rank, launcher.world_size)
        partition = client_partition(indices, len(base.dataset), num_clients, *where, seed)
        return cls(base, partition, source, length_bucketing=bool(getattr(source, "length_bucketing", False)))

    def serve(self, round_loader: Any) -> None:
        """From now on the source's ``train_dataloader()`` is ``round_loader()`` (Lightning asks every epoch)."""
        self.source.train_dataloader = round_loader

    def release(self) -> None:
        """Give the source its own ``train_dataloader`` back (at the end of fit, also when it fails)."""
        if self.source is not None:
            self.source.__dict__.pop("train_dataloader", None)

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def round_loader(
        self, ticket: RoundTicket, local_epochs: int, local_steps: int | None, seed: int
    ) -> tuple[DataLoader, RoundBatchSampler]:
        """The batches of ``ticket``'s clients, client after client, with the source loader's collate and workers."""
        sampler = RoundBatchSampler(
            self.client_indices,
            ticket.client_ids,
            self.batch_size,
            local_epochs=local_epochs,
            local_steps=local_steps,
            seed=seed,
            round_idx=ticket.round,
            instructions=ticket.instructions,
            lengths=self.lengths,
        )
        return DataLoader(self.dataset, batch_sampler=sampler, **self._loader_kwargs), sampler

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """A training batch of the usual size (the first examples), e.g. to count a step's FLOPs."""
        n = min(self.batch_size, len(self.dataset))  # type: ignore[arg-type]
        return self._loader_kwargs["collate_fn"]([self.dataset[i] for i in range(n)])

    def mean_local_batches(self, local_epochs: int, local_steps: int | None) -> float:
        """Local batches a client trains per round, averaged over the clients that have data."""
        if local_steps is not None:
            return float(local_steps)
        sizes = [len(ix) for ix in self.client_indices if len(ix)]
        return local_epochs * sum(math.ceil(n / self.batch_size) for n in sizes) / max(1, len(sizes))


def client_partition(
    source_indices: Sequence[Sequence[int]] | None,
    dataset_size: int,
    num_clients: int | None,
    mode: str,
    rank: int,
    world_size: int,
    seed: int,
) -> list[list[int]]:
    """Every client's example indices, from the data source's partition or an IID split (see the module).

    In ``mode: real`` with several ranks there is one client per rank (client id = rank), and only this
    rank's entry holds indices: all of its training set when the data module has one partition (each rank
    reads its own files), or partition ``rank`` when it has one per rank (one shared file, split).
    """
    if mode == "real" and world_size > 1:
        if source_indices is not None and len(source_indices) not in (1, world_size):
            raise ValueError(
                f"federation.mode='real': the data module has {len(source_indices)} client partitions for "
                f"{world_size} ranks; set data.num_clients=1 (every rank trains on all of its own data) or "
                f"{world_size} (rank r trains partition r of a shared file)"
            )
        if source_indices is not None and len(source_indices) == world_size:
            own = list(source_indices[rank])
            log.warning(
                "rank %d: mode 'real' with %d client partitions: this rank trains partition %d (%d of %d examples); "
                "if every rank has its own data, set data.num_clients=1",
                rank,
                world_size,
                rank,
                len(own),
                dataset_size,
            )
        else:
            own = list(range(dataset_size))
            log.info("rank %d: mode 'real': client %d trains on all %d examples of its data", rank, rank, dataset_size)
        return [own if r == rank else [] for r in range(world_size)]
    if source_indices is not None:
        if num_clients is not None and num_clients != len(source_indices):
            raise ValueError(
                f"RoundSync num_clients={num_clients} differs from the data module's {len(source_indices)} "
                f"client partitions; leave RoundSync num_clients unset"
            )
        return [list(ix) for ix in source_indices]
    if num_clients is None:
        raise ValueError(
            "RoundSync num_clients must be set when the data module has no client_indices "
            "(its training set is then split IID over num_clients clients)"
        )
    from lightning_fedpeft.data import partition_clients

    return partition_clients([0] * dataset_size, num_clients, "iid", seed=seed)


def training_loader(trainer: Any, pl_module: Any, owner_type: type) -> tuple[Any, DataLoader]:
    """The data source (the DataModule, else the LightningModule) and its own training loader.

    Drops a patch that a failed earlier fit may have left on the source (an instance attribute bound to
    an ``owner_type``).
    """
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    # No public API tells where fit takes its training data from: loaders passed straight to fit
    # cannot be re-laid out per round.
    data_source = getattr(trainer.fit_loop, "_data_source", None)
    if data_source is not None and getattr(data_source, "instance", source) is not source:
        raise ValueError(
            "RoundSync needs the training data from a LightningDataModule or LightningModule.train_dataloader(); "
            "pass `datamodule=` to Trainer.fit instead of `train_dataloaders=`"
        )
    stale = source.__dict__.get("train_dataloader")
    if stale is not None and isinstance(getattr(stale, "__self__", None), owner_type):
        source.__dict__.pop("train_dataloader")
    base = source.train_dataloader()
    if not isinstance(base, DataLoader):
        raise TypeError(f"RoundSync needs train_dataloader() to return a torch DataLoader, got {type(base).__name__}")
    return source, base
