"""The server's check of one large update, against the arithmetic it replaced, side by side.

``FederatedServer.submit`` checks every update (names, shapes, dtypes, finite values, the size of the
change) under the endpoint's lock before it records it, so its cost is paid once per client and blocks
every rank's upload. This bench submits one update of a large float32 state (62 MB by default, about the
full 2-layer MiniLM cut or a decoder LLM's LoRA state) and times the whole ``submit``. Beside it, as the
baseline, the check's arithmetic as it was before it took one float64-accumulated norm pass per tensor:
``isfinite`` over the update, then both sides cast to float64, subtracted, squared and summed.

    python bench/update_check.py                 # a few seconds; --mb, --threads, --repeats

Prints the median of ``--repeats`` runs of each side and the ratio. One process, nothing else running.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_fedpeft import FedAvg, FederatedServer
from lightning_fedpeft.protocol import ClientUpdate


def make_state(mb: float, seed: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of 384 x 1536 (a MiniLM FFN matrix, 2.25 MiB each) adding up to about ``mb``."""
    gen = torch.Generator().manual_seed(seed)
    count = max(1, round(mb * 2**20 / (384 * 1536 * 4)))
    return {f"layer{i}.weight": torch.randn(384, 1536, generator=gen) * 0.02 for i in range(count)}


def old_check(update: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """The baseline: what the check computed per tensor before (a float64 copy of both sides)."""
    change = 0.0
    for name, tensor in update.items():
        if not torch.isfinite(tensor).all():
            return float("nan")
        change += float((tensor.to(torch.float64) - ref[name].to(torch.float64)).pow(2).sum())
    return change


def time_submit(state: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> float:
    server = FederatedServer(FedAvg(1, seed=0), num_clients=1)
    server.initialize(state)
    (client,) = server.open_round(0).client_ids
    start = time.perf_counter()
    accepted = server.submit(ClientUpdate(client, 0, 1, update))
    seconds = time.perf_counter() - start
    if not accepted:
        raise SystemExit(f"the update was refused: {server.record.rejected}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=62.0, help="size of the trainable state, in MiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = make_state(args.mb, seed=0)
    update = {
        name: t + 1e-3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for name, t in state.items()
    }
    mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    sides = {"old check arithmetic (float64 copies)": [], "FederatedServer.submit (whole)": []}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both sides
        start = time.perf_counter()
        old_check(update, state)
        sides["old check arithmetic (float64 copies)"].append(time.perf_counter() - start)
        sides["FederatedServer.submit (whole)"].append(time_submit(state, update))
    print(
        f"one update of {mb:.1f} MiB float32 ({len(state)} tensors), {args.threads} thread(s), median of {args.repeats}"
    )
    medians = {side: statistics.median(times) for side, times in sides.items()}
    base = medians["old check arithmetic (float64 copies)"]
    for side, seconds in medians.items():
        print(f"{side:40s} {seconds:8.3f} s   {base / seconds:6.2f}x")


if __name__ == "__main__":
    main()
