"""Where every random stream of a run takes its seed: the run's seed and the stream's own coordinates.

Everything random (who trains in a round, a client's batch order and dropout, a trial group's sample, the DP
noise of a round, a grown adapter's new units) is seeded from ``(seed, round, client)``-like coordinates and
nothing else, so a run gives the same result in one process, over several ranks and after a resume.
"""

from __future__ import annotations

SEED_SCALE = 1_000_003  # the run's seed
ROUND_SCALE = 10_007  # a round (or a decision window)


def derived_seed(seed: int, *coords: int, scales: tuple[int, ...] = (SEED_SCALE, ROUND_SCALE, 1)) -> int:
    """``seed`` and a stream's coordinates, each times its scale, summed.

    The default scales serve ``(seed, round, index)``; a stream that weighs its coordinates otherwise names
    its own ``scales``, one per term, the seed's first (the values every stream has always had).
    """
    terms = (seed, *coords)
    if len(terms) != len(scales):
        raise ValueError(f"derived_seed: {len(terms)} terms but {len(scales)} scales")
    return sum(int(term) * scale for term, scale in zip(terms, scales, strict=True))
