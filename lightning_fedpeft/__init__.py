"""lightning-fedpeft: federated, parameter-efficient fine-tuning of language models with PyTorch Lightning."""

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm, FederatedRun
from lightning_fedpeft.callbacks import (
    ClientResources,
    FederatedProgressBar,
    FedProx,
    HeterogeneousLoRA,
    ModulePruning,
    ProgressiveUpgrade,
    RankAllocation,
    RoundSync,
)
from lightning_fedpeft.data import FederatedTextDataModule, partition_clients
from lightning_fedpeft.errors import NoUpdateAccepted, SetupError
from lightning_fedpeft.launchers import EmbeddedLauncher, FederationAborted, RPCLauncher
from lightning_fedpeft.module import FedPEFTModule
from lightning_fedpeft.protocol import ClientUpdate, RoundOutcome, RoundPlan, RoundRecord, RoundTicket
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import load_trainable_state, state_nbytes, trainable_state
from lightning_fedpeft.strategy import FedAvg, Query, Strategy

__version__ = "0.1.0"

__all__ = [
    "ClientContext",
    "ClientResources",
    "ClientResult",
    "ClientUpdate",
    "EmbeddedLauncher",
    "FedAvg",
    "FedPEFTModule",
    "FedProx",
    "FederatedAlgorithm",
    "FederatedProgressBar",
    "FederatedRun",
    "FederatedServer",
    "FederatedTextDataModule",
    "FederationAborted",
    "HeterogeneousLoRA",
    "ModulePruning",
    "ProgressiveUpgrade",
    "Query",
    "RPCLauncher",
    "RankAllocation",
    "RoundOutcome",
    "RoundPlan",
    "RoundRecord",
    "RoundSync",
    "RoundTicket",
    "NoUpdateAccepted",
    "SetupError",
    "Strategy",
    "load_trainable_state",
    "partition_clients",
    "state_nbytes",
    "trainable_state",
]
