"""The algorithm interface: what a federated algorithm implements once to run under :class:`RoundSync`.

An algorithm is a Lightning callback with two halves:

* the **server half**, a :class:`~lightning_fedpeft.strategy.Strategy` (plain torch, no Lightning) that
  :meth:`FederatedAlgorithm.configure` returns, or ``None`` for an algorithm that only adds client work;
  and the answers to the strategy's :class:`~lightning_fedpeft.strategy.Query` objects
  (:meth:`FederatedAlgorithm.answer_query`, on the server's process between rounds: the only place where
  the server's needs meet the model);
* the **client half**, :meth:`FederatedAlgorithm.on_client_start` and
  :meth:`FederatedAlgorithm.on_client_end`, told a :class:`ClientContext` (round, client, the plan's
  instructions for this client, the global state it started from) and answering with a
  :class:`ClientResult` (the tensors that travel with the update, the numbers that are logged), plus any
  Lightning hook it needs during local steps.

``RoundSync`` finds its algorithms among the Trainer's callbacks in its own ``setup`` (whatever their
order) and :func:`configure_algorithms` hands each a :class:`FederatedRun`, takes the one strategy, and
checks the whole together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.protocol import ClientContext, ClientResult, TrainableState
from lightning_fedpeft.state import load_trainable_state
from lightning_fedpeft.strategy import FedAvg, Query, Strategy

A = TypeVar("A", bound="FederatedAlgorithm")


@dataclass(frozen=True)
class FederatedRun:
    """What RoundSync tells its algorithms about the run when it sets them up."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    clients_per_round: int
    num_clients: int
    seed: int
    cost_model: CostModel | None
    algorithms: tuple[FederatedAlgorithm, ...]
    sample_batch: Callable[[], dict[str, torch.Tensor]]  # a training batch of the usual size
    mean_local_batches: Callable[[], float]  # local steps a client trains per round, on average

    def find(self, kind: type[A]) -> A | None:
        """The run's algorithm of type ``kind``, if there is one."""
        return next((a for a in self.algorithms if isinstance(a, kind)), None)


class FederatedAlgorithm(Callback):
    """Base class of the algorithms RoundSync runs (see the module docstring).

    ``requires`` names algorithms that must be in the same Trainer (RoundSync checks it);
    ``sizes_per_client`` says the algorithm gives clients configurations of their own.
    """

    requires: tuple[type[FederatedAlgorithm], ...] = ()
    # True for an algorithm that hands each client a configuration of its own (FedARA's prefixes on a
    # fleet, HeterogeneousLoRA's ranks): it checks that its smallest one fits every device's memory, where
    # RoundSync would otherwise check the global configuration.
    sizes_per_client: bool = False

    def configure(self, run: FederatedRun) -> Strategy | None:
        """Set up for ``run`` (on every process) and return the server half, or ``None`` if there is none.

        Raise ``ValueError`` naming the setting and the fix if the run cannot work with this algorithm.
        """
        return None

    def answer_query(self, query: Query, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Answer a question the strategy (which :meth:`configure` returned) asks about the model."""
        raise NotImplementedError(f"{type(self).__name__} cannot answer {query!r}")

    def adopt_state(self, pl_module: pl.LightningModule, state: TrainableState) -> None:
        """Reshape ``pl_module`` to hold ``state`` before RoundSync loads it (strictly) into a module that has
        no ``set_trainable_state`` of its own: a user's plain LightningModule. An algorithm whose states
        change shape (FedARA's ranks and pruned modules) makes the module fit them here."""

    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        """A client begins its local round: the global state is loaded, its optimizer is built right after
        (so the module may still change shape here) and the RNG is seeded from (seed, round, client)."""

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        """A client finished its local steps; what to send and log with its update."""
        return ClientResult()


def load_state(pl_module: pl.LightningModule, state: TrainableState, algorithms: Sequence[FederatedAlgorithm]) -> None:
    """Load ``state`` into ``pl_module`` as RoundSync does at every client and round.

    A module that can change shape to fit the state (adapters of another depth/width, SVD layers of another
    rank) says so by defining ``set_trainable_state``; any other module is first made to fit by the
    algorithms whose states change shape (:meth:`FederatedAlgorithm.adopt_state`), then gets a strict,
    in-place load.
    """
    setter = getattr(pl_module, "set_trainable_state", None)
    if callable(setter):
        setter(state)
        return
    for algorithm in algorithms:
        algorithm.adopt_state(pl_module, state)
    load_trainable_state(pl_module, state)


def configure_algorithms(run: FederatedRun, given: Strategy | None) -> tuple[FederatedAlgorithm | None, Strategy]:
    """Check what each of ``run``'s algorithms requires, configure every one, and pick the run's strategy.

    The strategy is the one an algorithm brings, else ``given``, else sample-weighted FedAvg; there can be
    only one, and it must sample the run's clients per round. Returns it with the algorithm that brought
    it (which answers its queries), or ``None`` for that.
    """
    for algorithm in run.algorithms:
        for needed in algorithm.requires:
            if run.find(needed) is None:
                raise ValueError(
                    f"{type(algorithm).__name__} needs the {needed.__name__} callback in the Trainer's callbacks"
                )
    built = [(a, s) for a in run.algorithms if (s := a.configure(run)) is not None]
    if len(built) > 1 or (built and given is not None):
        owners = [type(a).__name__ for a, _ in built] + (["RoundSync(strategy=...)"] if given is not None else [])
        raise ValueError(f"only one server strategy can run, but {' and '.join(owners)} each bring one")
    owner, strategy = built[0] if built else (None, given)
    if strategy is None:
        strategy = FedAvg(run.clients_per_round, seed=run.seed)
    if strategy.clients_per_round != run.clients_per_round:
        raise ValueError(
            f"federation.clients_per_round={run.clients_per_round} differs from the "
            f"{strategy.clients_per_round} the strategy samples; set them equal"
        )
    return owner, strategy
