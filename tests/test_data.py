"""The federated text DataModule: corpora by name, local files, the 20NG leak, the token cache."""

from __future__ import annotations

from pathlib import Path

from lightning_fedpeft import FederatedTextDataModule


def test_local_csv_with_custom_columns(topic_csv: Path, cache_dir: str) -> None:
    dm = FederatedTextDataModule(
        corpus=None,
        train_file=str(topic_csv),
        text_column="sentence",
        label_column="topic",
        num_clients=5,
        partitioner="iid",
        val_fraction=0.25,
        max_length=16,
        cache_dir=cache_dir,
    )
    assert dm.label_names == ["food", "sports", "tech"] and dm.num_labels == 3
    dm.setup("fit")
    train, val = len(dm.datasets["train"]), len(dm.datasets["dev"])
    assert (train, val) == (180, 60)  # 240 rows, a quarter held out for the server's validation
    assert sorted(i for part in dm.client_indices for i in part) == list(range(train))
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] <= 16
    # Dynamic padding: the batch is as long as its longest text, padded with the tokenizer's pad id.
    assert (batch["attention_mask"].sum(1) == batch["input_ids"].shape[1]).any()


def test_20ng_label_leak_is_stripped(cache_dir: str) -> None:
    dm = FederatedTextDataModule(
        corpus="20NG",
        num_clients=4,
        max_train_examples=100,
        max_val_examples=20,
        max_test_examples=20,
        cache_dir=cache_dir,
    )
    texts = [t for split in dm._raw.values() for t in split[0]]
    assert not any(t.startswith("Newsgroup:") or "Document_id:" in t[:200] for t in texts)
    assert dm.num_labels == 20


def test_tokenized_splits_are_cached(cache_dir: str) -> None:
    args = {
        "corpus": "stackoverflow",
        "num_clients": 4,
        "max_train_examples": 50,
        "max_val_examples": 10,
        "max_test_examples": 10,
        "max_length": 24,
        "cache_dir": cache_dir,
    }
    first = FederatedTextDataModule(**args)
    first.setup()
    second = FederatedTextDataModule(**args)
    second.setup()
    assert second.cache_hits == 3
    assert second.collate.pad_token_id == first.collate.pad_token_id
    assert all(
        a.equal(b) for a, b in zip(first.datasets["train"].input_ids, second.datasets["train"].input_ids, strict=True)
    )
    # A different max_length is a different cache entry.
    third = FederatedTextDataModule(**(args | {"max_length": 12}))
    third.setup()
    assert third.cache_hits == 0 and max(len(x) for x in third.datasets["train"].input_ids) <= 12
