"""A Rich progress bar that speaks in rounds and shows the latest global accuracy."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class FederatedProgressBar(RichProgressBar):
    """RichProgressBar whose training line reads ``Round k/N`` instead of ``Epoch k``.

    The latest ``val_acc`` and ``val_f1`` of the global model appear beside it (logged with ``prog_bar=True``).
    """

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger version is noise next to the round
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        description = f"Round {current_epoch + 1}/{total}" if total and total > 0 else f"Round {current_epoch + 1}"
        # Pad like Lightning does, so the line does not flicker against the "Validation" bar.
        return description.ljust(len(self.validation_description))
