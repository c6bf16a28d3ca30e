"""Fault injection for robustness studies: clients that send poisoned updates, on purpose.

A robust aggregator (:mod:`lightning_fedpeft.aggregation`) is only worth its cost if it holds against
the attacks it is chosen for. :class:`ScaledUpdateAttack` turns chosen clients into attackers that pass
every check of the server (finite values, the right names, shapes and dtypes, a change within
``server.MAX_CHANGE``), so that only the aggregation rule stands between them and the global model: the
classic model-poisoning attack of scaling, or sign-flipping, one's own change (Blanchard et al., 2017;
Fang et al., 2020). Used by ``bench/robust.py`` and the tests; in YAML::

    trainer:
      callbacks:
        - class_path: lightning_fedpeft.attacks.ScaledUpdateAttack
          init_args: {clients: [0, 1], factor: -10.0}
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_fedpeft.algorithm import FederatedAlgorithm
from lightning_fedpeft.protocol import ClientContext, ClientResult


class ScaledUpdateAttack(FederatedAlgorithm):
    """Each client in ``clients`` uploads ``global + factor x (its trained state - global)``.

    ``factor=-10``: the change sign-flipped and ten times as large; ``factor=50``: the same direction, 50
    times as far. The attack sits in the client half only (the server cannot tell it from honest work)
    and changes only the tensors the client received.

    Args:
        clients: the attackers' client ids (whenever they take part in a round).
        factor: what their change is multiplied by; ``1`` is honest.
    """

    def __init__(self, clients: list[int], factor: float = -10.0) -> None:
        super().__init__()
        if not all(isinstance(c, int) and c >= 0 for c in clients):
            raise ValueError(f"ScaledUpdateAttack clients={clients!r} must be client ids (integers >= 0)")
        if not torch.isfinite(torch.tensor(float(factor))):
            raise ValueError(f"ScaledUpdateAttack factor={factor} must be a finite number")
        self.clients, self.factor = frozenset(clients), float(factor)

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        if ctx.client_id not in self.clients:
            return ClientResult()
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                start = ctx.global_state.get(name)
                if start is not None and start.shape == param.shape:
                    start = start.to(param.device, param.dtype)  # the state arrives on the CPU
                    param.copy_(start + self.factor * (param - start))
        return ClientResult()
