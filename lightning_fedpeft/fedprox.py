"""FedProx (Li et al., 2020): a proximal term keeps every client near the global model it started from.

The local objective becomes ``loss + mu / 2 * ||w - w_global||^2`` over the trainable parameters, which
limits how far clients with skewed data drift apart between two aggregations. It is a client-only
algorithm (the server's FedAvg is unchanged) and the worked example of "write your own algorithm" in
``docs/architecture.md``: everything it needs is in the :class:`~lightning_fedpeft.ClientContext`.

Lightning owns the loss, so the term enters through its gradient: ``mu * (w - w_global)`` is added to
each trainable parameter's gradient before the optimizer step (and before Lightning's gradient
clipping), which gives the same update as adding the term to the loss.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm


class FedProx(FederatedAlgorithm):
    """The FedProx proximal term on every client's local steps.

    Args:
        mu: weight of the proximal term (0 is plain FedAvg). A strategy can give a client its own value
            with the instruction ``fedprox_mu``.
    """

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        _check_mu(mu, "fedprox.mu")
        self.mu = mu
        self._client_mu = mu
        self._anchor: dict[str, torch.Tensor] = {}  # the global state this client started from
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        mu = ctx.instructions.get("fedprox_mu", self.mu)
        _check_mu(mu, f"round {ctx.round}: client {ctx.client_id}'s instruction fedprox_mu")
        self._client_mu = float(mu)
        self._anchor = ctx.global_state
        self._pairs = []  # matched to the parameters at the first step (another algorithm may reshape them)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._client_mu == 0.0 or not self._anchor:
            return
        if not self._pairs:
            params = dict(pl_module.named_parameters())
            self._pairs = [(params[n], w.to(params[n].device)) for n, w in self._anchor.items() if n in params]
        for param, anchor in self._pairs:
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor, alpha=self._client_mu)

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        params = dict(pl_module.named_parameters())
        squared = sum(
            float((params[n].detach() - w.to(params[n].device)).pow(2).sum())
            for n, w in ctx.global_state.items()
            if n in params
        )
        return ClientResult(metrics={"fedprox_distance": math.sqrt(squared)})


def _check_mu(mu: object, what: str) -> None:
    if not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"{what}={mu!r} must be a finite number >= 0 (0 is plain FedAvg; e.g. 0.01, 0.1, 1)")
