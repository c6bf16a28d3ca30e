"""Callbacks that the multi-process tests add to ``fedpeft fit`` runs (imported via PYTHONPATH=tests)."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_fedpeft import ClientContext, ClientResult, FederatedAlgorithm, RoundSync
from lightning_fedpeft.state import trainable_state


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class SaveGlobalState(Callback):
    """On the server, save the starting (``<path>.initial``) and final global trainable states."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _rank() == 0:
            torch.save(trainable_state(pl_module), self.path + ".initial")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _rank() == 0:
            torch.save(trainable_state(pl_module), self.path)


class KillRank(Callback):
    """SIGKILL this process when ``rank`` reaches batch ``batch`` of round ``round`` (a crash mid-round)."""

    def __init__(self, rank: int, round: int, batch: int = 0) -> None:
        self.rank, self.round, self.batch = rank, round, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if _rank() == self.rank and trainer.current_epoch == self.round and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class CorruptUpdates(Callback):
    """On ``rank``, in round ``round``, send a NaN update for the first client and a wrong shape for the next."""

    def __init__(self, rank: int, round: int) -> None:
        self.rank, self.round = rank, round

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _rank() != self.rank:
            return
        launcher = RoundSync.find(trainer).launcher
        submit = launcher.submit
        sent = []

        def corrupted(update):  # noqa: ANN001, ANN202
            if update.round == self.round and len(sent) < 2:
                name = next(iter(update.state))
                bad = dict(update.state)
                bad[name] = torch.full_like(bad[name], float("nan")) if not sent else torch.zeros(3)
                update = type(update)(update.client_id, update.round, update.num_examples, bad, update.metrics)
                sent.append(update.client_id)
            return submit(update)

        launcher.submit = corrupted


class FailInTrainingStep(Callback):
    """On ``rank``, raise ``RuntimeError("boom ...")`` inside the model's forward at ``round``'s first step."""

    def __init__(self, rank: int, round: int) -> None:
        self.rank, self.round = rank, round

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _rank() != self.rank:
            return

        def fail(_module, _args) -> None:  # noqa: ANN001
            if pl_module.training and trainer.current_epoch == self.round:
                raise RuntimeError(f"boom in the training step of rank {self.rank}")

        pl_module.model.register_forward_pre_hook(fail)


class RecordOwnClients(FederatedAlgorithm):
    """Writes ``<path>.rank<R>.json``: per round, the clients this rank trained, their examples and steps."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rounds: dict[int, dict[int, dict[str, int]]] = {}
        self._steps = 0

    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        self._steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:  # noqa: ANN002
        self._steps += 1

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        self.rounds.setdefault(ctx.round, {})[ctx.client_id] = {"examples": ctx.num_examples, "steps": self._steps}
        return ClientResult()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(f"{self.path}.rank{_rank()}.json", "w") as fh:
            json.dump(self.rounds, fh)
