"""Wall-clock of a simulated federated round: lightning-fedpeft (Trainer + RoundSync) vs a bare PyTorch loop.

Both sides train the same model (MiniLM with adapters) on the same client batches of the same rounds:
the participants come from the same FedAvg strategy and the local batches from the same
RoundBatchSampler, each client starts from the global trainable state with a fresh AdamW, and the
round ends with sample-weighted averaging. The bare loop is what one would write by hand without
Lightning; the ratio is our overhead per round (goal <= 1.10). Round 0 of each side is a warm-up and
is not counted.

    python bench/round_overhead.py            # defaults below; --help for the knobs
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import lightning.pytorch as pl
import torch
from _common import quiet_trainer

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, RoundSync
from lightning_fedpeft.rounds import RoundBatchSampler
from lightning_fedpeft.state import load_trainable_state, trainable_state
from lightning_fedpeft.strategy import FedAvg


def build(args: argparse.Namespace) -> tuple[FederatedTextDataModule, FedPEFTModule]:
    data = FederatedTextDataModule(
        corpus=args.corpus, num_clients=args.num_clients, max_length=args.max_length, batch_size=args.batch_size
    )
    data.setup("fit")
    torch.manual_seed(0)
    module = FedPEFTModule(num_labels=data.num_labels, method="adapter", depth=args.depth, width=32, lr=5e-3)
    return data, module


def lightning_rounds(args: argparse.Namespace, data: FederatedTextDataModule, module: FedPEFTModule) -> list[float]:
    sync = RoundSync(clients_per_round=args.clients_per_round, local_steps=args.local_steps, seed=args.seed)
    trainer = quiet_trainer(
        max_epochs=args.rounds + 1,
        callbacks=[sync],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return [row["round_time_s"] for row in sync.history[1:]]


def bare_rounds(args: argparse.Namespace, data: FederatedTextDataModule, module: FedPEFTModule) -> list[float]:
    model = module.model
    model.train()
    dataset, collate = data.datasets["train"], data.collate
    strategy = FedAvg(args.clients_per_round, seed=args.seed)
    global_state = trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for round_idx in range(args.rounds + 1):
        start = time.perf_counter()
        plan = strategy.configure_round(round_idx, len(data.client_indices))
        sampler = RoundBatchSampler(
            data.client_indices,
            plan.client_ids,
            args.batch_size,
            local_steps=args.local_steps,
            seed=args.seed,
            round_idx=round_idx,
        )
        states, counts = [], []
        for seg in sampler.segments:
            load_trainable_state(model, global_state)
            optimizer = torch.optim.AdamW(params, lr=module.hparams.lr)  # the module's own settings
            for batch_ids in sampler.batches[seg.first_batch : seg.last_batch + 1]:
                batch = collate([dataset[i] for i in batch_ids])
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            states.append(copy.deepcopy(trainable_state(model)))
            counts.append(seg.num_examples)
        total = sum(counts)
        global_state = {k: sum(s[k] * (n / total) for s, n in zip(states, counts, strict=True)) for k in global_state}
        load_trainable_state(model, global_state)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="20NG")
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per repeat (after one warm-up round)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of both sides")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)

    bare, ours = [], []
    for _ in range(args.repeats):  # alternate the sides so drift in machine speed hits both
        data, module = build(args)
        bare += bare_rounds(args, data, module)
        data, module = build(args)
        ours += lightning_rounds(args, data, module)
    b, o = statistics.median(bare), statistics.median(ours)
    steps = args.clients_per_round * args.local_steps
    print(
        f"round = {args.clients_per_round} clients x {args.local_steps} local steps "
        f"(batch {args.batch_size}, {args.max_length} tokens, MiniLM adapters depth {args.depth}), "
        f"{len(bare)} timed rounds per side, {args.threads} threads"
    )
    print(f"{'side':<28}{'median s/round':>16}{'s/step':>10}")
    print(f"{'bare PyTorch loop':<28}{b:>16.3f}{b / steps:>10.3f}")
    print(f"{'Trainer + RoundSync':<28}{o:>16.3f}{o / steps:>10.3f}")
    print(f"ratio (ours / bare): {o / b:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
