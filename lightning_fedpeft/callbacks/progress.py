"""A Rich progress bar that speaks in rounds and shows the latest global accuracy."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class FederatedProgressBar(RichProgressBar):
    """RichProgressBar whose training line reads ``Round k/N`` instead of ``Epoch k``.

    The latest ``val_acc`` and ``round`` appear beside it because they are logged with ``prog_bar=True``.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        description = f"Round {current_epoch + 1}/{total}" if total and total > 0 else f"Round {current_epoch + 1}"
        # Pad like Lightning does, so the line does not flicker against the "Validation" bar.
        return description.ljust(len(self.validation_description))
