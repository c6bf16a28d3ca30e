"""lightning-fedpeft: federated, parameter-efficient fine-tuning of language models with PyTorch Lightning."""

from lightning_fedpeft.callbacks import FederatedProgressBar, RoundSync
from lightning_fedpeft.data import FederatedTextDataModule, partition_clients
from lightning_fedpeft.launchers import EmbeddedLauncher
from lightning_fedpeft.module import FedPEFTModule
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import load_trainable_state, state_nbytes, trainable_state
from lightning_fedpeft.strategy import ClientUpdate, FedAvg, RoundPlan, Strategy

__version__ = "0.1.0"

__all__ = [
    "ClientUpdate",
    "EmbeddedLauncher",
    "FedAvg",
    "FedPEFTModule",
    "FederatedProgressBar",
    "FederatedServer",
    "FederatedTextDataModule",
    "RoundPlan",
    "RoundSync",
    "Strategy",
    "load_trainable_state",
    "partition_clients",
    "state_nbytes",
    "trainable_state",
]
