"""Mean pooling for encoder classifiers: the masked average of the token states in place of the first token."""

from __future__ import annotations

import torch
from torch import nn

POOLINGS: tuple[str, ...] = ("mean", "model")


class MaskedMeanPooler(nn.Module):
    """Replaces a BERT-style ``pooler``: the average of the non-padding token states.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with mean pooling; their
    ``[CLS]`` state and pre-trained pooler are almost constant across inputs, so a classifier on top of
    them barely learns. The attention mask is handed over by a
    forward pre-hook on the encoder, because the pooler itself is only called with the hidden states.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        self.mask = None
        if mask is None or mask.shape != hidden.shape[:2]:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPooledHead(nn.Module):
    """Replaces a first-token classification head (RoBERTa, MPNet: dense, tanh, dropout, projection) with
    dropout and one linear layer on the masked mean of the token states.

    This mirrors mean pooling on BERT, where the pooler's dense + tanh give way to the mean and the head is
    one linear layer (FedAdapter's head too). Keeping the 768 x 768 dense layer would make MPNet's head
    45 times the size of one width-8 adapter (590 K against 13 K parameters), shipped every round.
    """

    def __init__(self, out_proj: nn.Linear, dropout: nn.Module, pooler: MaskedMeanPooler) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.out_proj = out_proj

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.pooler(features)))


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Make the classifier read the masked mean of the token states (in place); return the model.

    BERT-style models: the ``pooler`` is swapped for :class:`MaskedMeanPooler`. Models without a pooler
    whose head reads the first token and ends in ``out_proj`` (RoBERTa, MPNet): the head becomes
    :class:`MeanPooledHead`.
    """
    base = getattr(model, "base_model", None)
    head = getattr(model, "classifier", None)
    pooler = MaskedMeanPooler()
    if getattr(base, "pooler", None) is not None:
        base.pooler = pooler
    elif base is not None and isinstance(getattr(head, "out_proj", None), nn.Linear):
        model.classifier = MeanPooledHead(head.out_proj, getattr(head, "dropout", nn.Identity()), pooler)
    else:
        raise ValueError(
            f"model.pooling='mean' needs a BERT-style pooler or a first-token classification head; "
            f"{type(model).__name__} has neither. Set model.pooling='model' to use the model's own head"
        )

    def stash_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask

    base.register_forward_pre_hook(stash_mask, with_kwargs=True)
    return model
