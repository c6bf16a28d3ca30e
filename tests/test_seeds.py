"""One helper seeds every random stream, with the values each stream had before it existed."""

from __future__ import annotations

import pytest

from lightning_fedpeft.rounds import client_seed
from lightning_fedpeft.seeds import SEED_SCALE, derived_seed


@pytest.mark.parametrize(("seed", "a", "b"), [(0, 0, 0), (42, 3, 17), (7, 250, 99), (123456, 1, 0)])
def test_every_stream_keeps_the_seed_its_own_formula_gave(seed: int, a: int, b: int) -> None:
    assert client_seed(seed, a, b) == (seed * 1_000_003 + a * 10_007 + b) % (2**63 - 1)  # batches, dropout
    assert derived_seed(seed, a, scales=(SEED_SCALE, 1)) == seed * 1_000_003 + a  # a round's participants
    assert derived_seed(seed, a, b) == seed * 1_000_003 + a * 10_007 + b  # a FedAdapter trial's sample
    assert derived_seed(seed, a, 17, scales=(SEED_SCALE, 7_919, 1)) == seed * 1_000_003 + a * 7_919 + 17  # DP noise
    assert derived_seed(seed, a, b, scales=(7919, 131, 1)) == seed * 7919 + a * 131 + b  # grown adapter units


def test_a_scale_per_term() -> None:
    with pytest.raises(ValueError, match="3 terms but 2 scales"):
        derived_seed(1, 2, 3, scales=(5, 7))
