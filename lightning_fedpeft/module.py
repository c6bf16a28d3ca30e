"""The LightningModule: a Hugging Face classifier wrapped with a parameter-efficient method."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_fedpeft.models import PEFT_METHODS, PEFTMethod, apply_peft, load_backbone, resolve_model_path
from lightning_fedpeft.state import TrainableState, load_trainable_state, trainable_state


class FedPEFTModule(pl.LightningModule):
    """Sequence classification with adapters, LoRA, truncated-SVD LoRA or full fine-tuning.

    Args:
        model_name_or_path: a local Hugging Face model folder, or ``minilm`` for the packaged
            all-MiniLM-L6-v2.
        num_labels: number of classes (linked from the data module by the CLI).
        method: ``adapter`` | ``lora`` | ``svd`` | ``full``.
        depth: adapters: how many top layers get an adapter (the rest of the backbone is frozen).
        width: adapters: bottleneck size.
        rank: lora/svd: rank of each adapted matrix.
        lora_alpha: lora/svd: scaling numerator (``lora_alpha / rank``).
        lora_dropout: lora/svd: dropout on the low-rank path.
        target_modules: lora/svd: module name suffixes to adapt (default: query/value for LoRA, all six
            linear kinds for SVD).
        num_hidden_layers: keep only the first N pre-trained layers (a cheap model for tests).
        pooling: ``mean`` (average of the token states; right for sentence-embedding checkpoints such as
            MiniLM) or ``model`` (the checkpoint's own pooler / head).
        optimizer: ``adamw`` or ``sgd``.
        lr: learning rate of the local optimizer.
        weight_decay: weight decay of the local optimizer.

    Gradient clipping is Lightning's: set ``trainer.gradient_clip_val``.
    """

    def __init__(
        self,
        model_name_or_path: str = "minilm",
        num_labels: int = 2,
        method: PEFTMethod = "adapter",
        depth: int = 6,
        width: int = 32,
        rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        num_hidden_layers: int | None = None,
        pooling: str = "mean",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if method not in PEFT_METHODS:
            raise ValueError(f"model.method={method!r} is not a known PEFT method; allowed: {', '.join(PEFT_METHODS)}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"model.optimizer={optimizer!r} is not supported; allowed: adamw, sgd")
        if num_labels < 2:
            raise ValueError(f"model.num_labels={num_labels} must be at least 2")
        if lr <= 0:
            raise ValueError(f"model.lr={lr} must be positive")
        self.save_hyperparameters()
        path = resolve_model_path(model_name_or_path)
        backbone = load_backbone(path, num_labels=num_labels, num_hidden_layers=num_hidden_layers, pooling=pooling)
        try:
            self.model = apply_peft(
                backbone,
                method,
                depth=depth,
                width=width,
                rank=rank,
                alpha=lora_alpha,
                dropout=lora_dropout,
                target_modules=target_modules,
            )
        except ValueError as err:
            raise ValueError(f"model: {err}") from err
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the modes it finds
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
                "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    # -- federated state -------------------------------------------------------------------------------
    def get_trainable_state(self) -> TrainableState:
        """The flat, named tensors that federated rounds exchange (every parameter with ``requires_grad``)."""
        return trainable_state(self)

    def set_trainable_state(self, state: TrainableState) -> None:
        """Load a state produced by :meth:`get_trainable_state` (on this or an identically built module)."""
        load_trainable_state(self, state)

    # -- Lightning ---------------------------------------------------------------------------------------
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # With labels in the batch, HF computes cross-entropy (and peft's AdaLoRA adds its orthogonality
        # penalty to it).
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=False, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, prefix: str) -> None:
        out = self.model(**batch)
        metrics.update(out.logits.argmax(dim=-1), batch["labels"])
        self.log(f"{prefix}_loss", out.loss, batch_size=batch["labels"].shape[0])
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Called again for every client of every round by RoundSync, so each client starts with a fresh
        # optimizer state, as in FedAvg.
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
