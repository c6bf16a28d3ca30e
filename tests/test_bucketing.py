"""Length bucketing: the same examples per pass, less padding, and the response-only loss of every row unchanged."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, RoundSync
from lightning_fedpeft.rounds import bucket_by_length, client_batches


def _clinc(tokenizer: str, cache_dir: str, **settings: Any) -> FederatedTextDataModule:
    """CLINC150 requests as instructions (prompts of many lengths), 48 tokens at most, on the tiny decoder."""
    defaults = {"task": "causal_lm", "corpus": "clinc", "tokenizer": tokenizer, "max_length": 48}
    defaults |= {"partitioner": "iid", "max_train_examples": 96, "max_val_examples": 8, "max_test_examples": 8}
    return FederatedTextDataModule(**(defaults | {"cache_dir": cache_dir} | settings))


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Pad tokens the batches hold (every row padded to its batch's longest)."""
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_buckets_hold_every_example_once_per_pass_and_pad_less() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=gen).tolist()
    indices = list(range(0, 1000, 2))  # one client's examples

    def layout(bucketed: bool, seed: int = 7) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return client_batches(indices, 8, local_epochs=2, generator=g, lengths=lengths if bucketed else None)

    plain, bucketed = layout(False), layout(True)
    per_pass = len(plain) // 2
    for batches in (bucketed[:per_pass], bucketed[per_pass:]):  # each pass: every example exactly once
        assert sorted(i for b in batches for i in b) == indices
    assert [len(b) for b in bucketed].count(8) == len(bucketed) - 2  # one short batch per pass, as before
    assert _padding(bucketed, lengths) < 0.25 * _padding(plain, lengths)
    assert layout(True) == bucketed and layout(True, seed=8) != bucketed  # seeded, like every batch order
    # local_steps cuts the stream of bucketed passes just as it cuts plain ones
    g = torch.Generator().manual_seed(7)
    assert client_batches(indices, 8, local_steps=5, generator=g, lengths=lengths) == bucketed[:5]


def test_a_bucket_is_sorted_longest_first_then_the_batches_are_shuffled() -> None:
    lengths = [3, 9, 1, 7, 5, 2, 8, 4]
    batches = bucket_by_length(list(range(8)), 2, lengths, torch.Generator().manual_seed(0))
    assert sorted(batches) == sorted([[1, 6], [3, 4], [7, 0], [5, 2]])


def test_bucketing_leaves_the_summed_response_loss_unchanged(tiny_llama: str, cache_dir: str) -> None:
    data = _clinc(tiny_llama, cache_dir, num_clients=1, max_train_examples=64)
    data.setup()
    dataset = data.datasets["train"]
    lengths = dataset.lengths()
    assert len(set(lengths)) > 5  # rows of many lengths: padding differs between the layouts
    torch.manual_seed(0)
    module = FedPEFTModule(tiny_llama, task="causal_lm", method="lora", rank=4).eval()
    indices = list(range(len(dataset)))

    def summed_loss(batches: list[list[int]]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for b in batches:
                batch = data.collate([dataset[i] for i in b])
                targets = int((batch["labels"][:, 1:] != -100).sum())  # the loss is the mean over these
                total += module.model(**batch).loss.double() * targets
        return total

    plain = client_batches(indices, 8, generator=torch.Generator().manual_seed(1))
    bucketed = client_batches(indices, 8, generator=torch.Generator().manual_seed(1), lengths=lengths)
    assert _padding(bucketed, lengths) < _padding(plain, lengths)
    torch.testing.assert_close(summed_loss(bucketed), summed_loss(plain), rtol=1e-5, atol=0)


class _PaddingCount(pl.Callback):
    """Counts the pad tokens of every batch the Trainer trains on."""

    def __init__(self) -> None:
        self.pads = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.pads += int((batch["attention_mask"] == 0).sum())


def test_the_data_module_setting_buckets_roundsyncs_batches(tiny_llama: str, cache_dir: str, trainer_factory) -> None:
    def a_round(length_bucketing: bool) -> tuple[int, float]:
        data = _clinc(tiny_llama, cache_dir, num_clients=2, batch_size=4, length_bucketing=length_bucketing)
        torch.manual_seed(0)
        module = FedPEFTModule(tiny_llama, task="causal_lm", method="lora", rank=4)
        count = _PaddingCount()
        sync = RoundSync(clients_per_round=2, local_epochs=1, seed=0)
        trainer = trainer_factory(max_epochs=1, callbacks=[sync, count], limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        return count.pads, sync.history[0]["train_loss"]

    plain_pads, plain_loss = a_round(False)
    bucket_pads, bucket_loss = a_round(True)
    assert bucket_pads < 0.5 * plain_pads
    assert torch.isfinite(torch.tensor(bucket_loss)) and bucket_loss != plain_loss  # other batches, other steps
