"""Lightning callbacks that make a Trainer federated."""

from lightning_fedpeft.callbacks.client_resources import ClientResources
from lightning_fedpeft.callbacks.progress import FederatedProgressBar
from lightning_fedpeft.callbacks.round_sync import RoundSync

__all__ = ["ClientResources", "FederatedProgressBar", "RoundSync"]
