"""A fleet: which device profile every client runs on.

Two ways to say it (exactly one):

* ``fractions``: shares of named profiles, e.g. ``{rpi4b: 0.5, orin_nano: 0.3, tx2: 0.2}``. The counts are
  the shares times the number of clients, rounded by largest remainder (ties to the profile named first),
  and which client gets which device is a permutation drawn from the run's seed alone, so every process,
  a resumed run and a rerun deal the same fleet.
* ``mapping_file``: a YAML or JSON file ``{client_id: profile}`` (every client once), or a CSV file with
  columns ``client`` and ``device``: for a fleet that exists.

Profiles come from the cost model's profile file (:func:`lightning_fedpeft.cost.load_device_profiles`), which
gives each one its speed and, for the fleet, its memory (``memory_gb``). Everything is checked when the
fleet is dealt, before any training: unknown profile names, shares that are not positive or do not sum to 1,
a mapping that misses a client or names one that does not exist.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lightning_fedpeft.seeds import SEED_SCALE, derived_seed

FLEET_SALT = 48_611  # keeps the fleet's permutation apart from every other stream drawn from the run's seed


@dataclass(frozen=True)
class Fleet:
    """Which device each client trains on (see the module docstring).

    Args:
        fractions: share of the clients per profile name; the shares sum to 1.
        mapping_file: a YAML/JSON ``{client: profile}`` file or a CSV with columns ``client,device``.
        round_budget_s: the simulated seconds a round may take when an algorithm hands out per-client
            configurations (FedARA's prefixes); ``None``: each round, the median participant's predicted
            time at the global configuration.
    """

    fractions: Mapping[str, float] | None = None
    mapping_file: str | None = None
    round_budget_s: float | None = None

    def __post_init__(self) -> None:
        if (self.fractions is None) == (self.mapping_file is None):
            raise ValueError(
                "cost_model.fleet needs exactly one of fractions (e.g. {rpi4b: 0.5, tx2: 0.5}) and mapping_file "
                "(a client -> device file)"
            )
        if self.fractions is not None:
            if not self.fractions:
                raise ValueError("cost_model.fleet.fractions is empty; name at least one profile")
            for name, share in self.fractions.items():
                if isinstance(share, bool) or not isinstance(share, int | float) or not (0 < share <= 1):
                    raise ValueError(f"cost_model.fleet.fractions[{name!r}]={share!r} must be a share within (0, 1]")
            total = sum(float(s) for s in self.fractions.values())
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(
                    f"cost_model.fleet.fractions sum to {total:g}, not 1: {dict(self.fractions)}; "
                    f"make the shares add up"
                )
        if self.round_budget_s is not None and not (math.isfinite(self.round_budget_s) and self.round_budget_s > 0):
            raise ValueError(
                f"cost_model.fleet.round_budget_s={self.round_budget_s} must be a positive number of seconds "
                f"(or null: the median participant's time)"
            )

    def profile_names(self) -> list[str]:
        """The profile names the fleet uses (for a mapping file, as read from it)."""
        if self.fractions is not None:
            return list(self.fractions)
        return sorted(set(read_mapping(self.mapping_file).values()))

    def deal(self, num_clients: int, seed: int, known: Sequence[str]) -> list[str]:
        """Each client's profile name, client 0 first; ``known`` are the profiles that exist.

        Raises ``ValueError`` naming the setting when a profile is unknown or the mapping does not cover
        exactly the clients ``0..num_clients-1``.
        """
        unknown = sorted(set(self.profile_names()) - set(known))
        if unknown:
            where = "fractions" if self.fractions is not None else f"mapping_file {self.mapping_file!r}"
            raise ValueError(
                f"cost_model.fleet.{where} names unknown device profile(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        if self.mapping_file is not None:
            mapping = read_mapping(self.mapping_file)
            missing = [c for c in range(num_clients) if c not in mapping]
            extra = sorted(c for c in mapping if not 0 <= c < num_clients)
            if missing or extra:
                raise ValueError(
                    f"cost_model.fleet.mapping_file {self.mapping_file!r} must give a device to each of the "
                    f"{num_clients} clients 0..{num_clients - 1}: missing {missing[:5]}, unknown clients {extra[:5]}"
                )
            return [mapping[c] for c in range(num_clients)]
        assert self.fractions is not None
        counts = largest_remainder(self.fractions, num_clients)
        slots = [name for name, n in counts.items() for _ in range(n)]
        gen = torch.Generator().manual_seed(derived_seed(seed, FLEET_SALT, scales=(SEED_SCALE, 1)))
        order = torch.randperm(num_clients, generator=gen).tolist()
        devices = [""] * num_clients
        for slot, client in zip(slots, order, strict=True):
            devices[client] = slot
        return devices


def largest_remainder(fractions: Mapping[str, float], total: int) -> dict[str, int]:
    """Whole counts per name that sum to ``total``, closest to ``share * total`` (Hamilton's method)."""
    exact = {name: float(share) * total for name, share in fractions.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    left = total - sum(counts.values())
    names = list(fractions)
    by_remainder = sorted(names, key=lambda n: (-(exact[n] - counts[n]), names.index(n)))
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def read_mapping(path: str | None) -> dict[int, str]:
    """``{client: profile}`` from a YAML/JSON mapping or a CSV with columns ``client,device``."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ValueError(f"cost_model.fleet.mapping_file={str(path)!r} does not exist; give a client -> device file")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"client", "device"} <= set(reader.fieldnames):
                raise ValueError(f"cost_model.fleet.mapping_file {str(p)!r}: a CSV needs the columns client,device")
            pairs = [(row["client"], row["device"]) for row in reader]
    else:
        text = p.read_text()
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ValueError(f"cost_model.fleet.mapping_file {str(p)!r}: expected a mapping client -> device")
        pairs = list(raw.items())
    out: dict[int, str] = {}
    for client, device in pairs:
        try:
            cid = int(str(client).strip())
        except ValueError as err:
            raise ValueError(
                f"cost_model.fleet.mapping_file {str(p)!r}: client {client!r} is not a whole number"
            ) from err
        if cid in out:
            raise ValueError(f"cost_model.fleet.mapping_file {str(p)!r}: client {cid} is given twice")
        out[cid] = str(device).strip()
    return out


def fleet_counts(devices: Sequence[str]) -> dict[str, int]:
    """How many clients run each profile (in order of first appearance)."""
    return dict(Counter(devices))
