"""Tokenized classification examples and how a batch of them is padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


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
