"""Splitting a training set over clients with flwr-datasets' partitioners (label skew, or a client column)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Partitioner = Literal["iid", "dirichlet", "pathological", "natural"]
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "natural")


def partition_clients(
    labels: Sequence[int],
    num_clients: int,
    partitioner: str = "dirichlet",
    alpha: float = 1.0,
    classes_per_client: int = 2,
    min_partition_size: int | None = None,
    seed: int = 42,
    client_ids: Sequence[str] | None = None,
) -> list[list[int]]:
    """Split example indices over ``num_clients`` with a flwr-datasets partitioner.

    Returns one list of indices (into ``labels``) per client; every index appears exactly once. With
    ``partitioner="natural"`` there is one client per distinct value of ``client_ids`` (flwr-datasets'
    ``NaturalIdPartitioner``, in sorted order of the values), and ``num_clients`` is not used.
    """
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if partitioner not in PARTITIONERS:
        raise ValueError(f"data.partitioner={partitioner!r} is unknown; allowed: {', '.join(PARTITIONERS)}")
    if partitioner == "natural":
        if client_ids is None:
            raise ValueError("data.partitioner='natural' needs data.client_column: the column naming each row's client")
        part = NaturalIdPartitioner(partition_by="client")
        part.dataset = HFDataset.from_dict({"client": [str(c) for c in client_ids], "idx": list(range(len(labels)))})
        return [list(part.load_partition(i)["idx"]) for i in range(part.num_partitions)]
    if num_clients < 1:
        raise ValueError(f"data.num_clients={num_clients} must be at least 1")
    if len(labels) < num_clients:
        raise ValueError(
            f"data.num_clients={num_clients} exceeds the {len(labels)} training examples; "
            f"use at most {len(labels)} clients or more data"
        )
    if partitioner == "dirichlet" and not alpha > 0:
        raise ValueError(f"data.alpha={alpha} must be > 0 (smaller is more skewed; e.g. 0.1, 1, 10)")
    if partitioner == "pathological" and classes_per_client < 1:
        raise ValueError(f"data.classes_per_client={classes_per_client} must be at least 1")
    table = HFDataset.from_dict({"label": list(labels), "idx": list(range(len(labels)))})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_clients)
    elif partitioner == "dirichlet":
        if min_partition_size is None:
            min_partition_size = max(1, min(10, len(labels) // (2 * num_clients)))
        part = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            seed=seed,
        )
    else:
        part = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            seed=seed,
        )
    part.dataset = table
    try:
        return [list(part.load_partition(i)["idx"]) for i in range(num_clients)]
    except ValueError as err:
        hint = ""
        if partitioner == "dirichlet":
            hint = (
                f" (alpha={alpha}, {num_clients} clients, at least {min_partition_size} examples each): lower "
                f"data.min_partition_size, raise data.alpha or use fewer data.num_clients"
            )
        raise ValueError(f"data.partitioner={partitioner!r} could not split the data{hint}: {err}") from err
