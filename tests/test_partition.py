import pytest
import torch

from lightning_fedpeft.data import partition_clients


def _labels(n: int = 2000, classes: int = 10) -> list[int]:
    return [i % classes for i in range(n)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partition_sizes_add_up(partitioner: str) -> None:
    labels = _labels()
    parts = partition_clients(labels, 20, partitioner=partitioner, alpha=1.0, classes_per_client=2)
    assert len(parts) == 20
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "an example was given to two clients"
    if partitioner != "pathological":  # pathological may leave classes nobody draws; the others cover all
        assert sorted(flat) == list(range(len(labels)))
    assert all(len(p) > 0 for p in parts)


def _mean_label_skew(parts: list[list[int]], labels: list[int], classes: int) -> float:
    """Average total-variation distance between each client's label mix and the global one."""
    total = torch.bincount(torch.tensor(labels), minlength=classes).double()
    total /= total.sum()
    dists = []
    for p in parts:
        counts = torch.bincount(torch.tensor([labels[i] for i in p]), minlength=classes).double()
        dists.append(0.5 * (counts / counts.sum() - total).abs().sum().item())
    return sum(dists) / len(dists)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = _labels()
    skews = [
        _mean_label_skew(partition_clients(labels, 20, "dirichlet", alpha=a, min_partition_size=5), labels, 10)
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2], skews
    iid = _mean_label_skew(partition_clients(labels, 20, "iid"), labels, 10)
    assert iid < skews[1]


def test_partition_is_reproducible_with_the_seed() -> None:
    labels = _labels()
    a = partition_clients(labels, 10, "dirichlet", alpha=0.5, seed=3)
    b = partition_clients(labels, 10, "dirichlet", alpha=0.5, seed=3)
    c = partition_clients(labels, 10, "dirichlet", alpha=0.5, seed=4)
    assert a == b and a != c


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_clients": 5000}, "data.num_clients"),
        ({"alpha": 0.0}, "data.alpha"),
        ({"alpha": -1.0}, "data.alpha"),
        ({"partitioner": "random"}, "data.partitioner"),
    ],
)
def test_partition_bad_input(kwargs: dict, needle: str) -> None:
    args = {"num_clients": 10, "partitioner": "dirichlet", "alpha": 1.0} | kwargs
    with pytest.raises(ValueError, match=needle):
        partition_clients(_labels(), **args)
