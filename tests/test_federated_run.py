"""A short real federated fine-tune: 3 rounds of adapters on the 2-layer MiniLM cut beat chance."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_fedpeft import FedPEFTModule, RoundSync
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.state import state_nbytes, trainable_state


def test_three_rounds_beat_chance_on_held_out_data(stackoverflow, trainer_factory, tmp_path: Path) -> None:
    pl.seed_everything(0)
    # Stack Overflow question titles: short texts, 20 classes; learnable in a few dozen steps.
    data = stackoverflow(
        num_clients=8,
        partitioner="dirichlet",
        alpha=1.0,
        max_train_examples=800,
        max_val_examples=200,
        max_test_examples=300,
        max_length=64,
    )
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=2, width=16, lr=5e-3)
    sync = RoundSync(clients_per_round=4, local_epochs=1, seed=0)
    trainer = trainer_factory(max_epochs=3, callbacks=[sync], logger=CSVLogger(tmp_path))
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)

    chance = 1 / data.num_labels
    assert result["test_acc"] > 3 * chance, result

    # Per-round accounting: one row per round, real tensor sizes each way, a wall time, validation metrics.
    assert [row["round"] for row in sync.history] == [0, 1, 2]
    state_bytes = state_nbytes(trainable_state(model))
    for row in sync.history:
        assert row["clients"] == 4 and row["missing"] == 0
        assert row["bytes_up"] == row["bytes_down"] == 4 * state_bytes
        assert row["round_time_s"] > 0 and 0 <= row["val_acc"] <= 1 and "val_f1" in row
    assert sync.history[-1]["train_loss"] < sync.history[0]["train_loss"]

    # The same rows land in rounds.csv next to the logger's metrics.csv.
    with open(Path(trainer.log_dir) / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    with open(Path(trainer.log_dir) / "metrics.csv") as fh:
        logged = list(csv.DictReader(fh))
    assert any(r.get("round_bytes_up") for r in logged) and any(r.get("val_acc") for r in logged)


def test_the_last_round_is_evaluated_whatever_eval_every(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=6, max_train_examples=96, max_val_examples=32, max_test_examples=32)

    def evaluated(max_epochs: int, eval_every: int, **sync_kwargs: object) -> tuple[list[int], list[int]]:
        pl.seed_everything(0)
        model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=1, width=8)
        sync = RoundSync(clients_per_round=2, seed=0, eval_every=eval_every, **sync_kwargs)
        trainer = trainer_factory(max_epochs=max_epochs, callbacks=[sync])
        trainer.fit(model, datamodule=data)
        assert trainer.check_val_every_n_epoch == eval_every  # the schedule is back for later fits
        return [r["round"] for r in sync.history], [r["round"] for r in sync.history if "val_acc" in r]

    # max_epochs=3 with eval_every=2: round 1 on schedule, round 2 because it is the last.
    assert evaluated(3, 2) == ([0, 1, 2], [1, 2])
    # A simulated-time budget spent in round 0 ends the run there, and that round is evaluated.
    assert evaluated(4, 10, cost_model=CostModel("tx2", 1.0), max_sim_hours=1e-12) == ([0], [0])


class _DivergeEveryClient(pl.Callback):
    """Every client ends with a NaN in its trainable state (a diverged local run), before RoundSync reads it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        with torch.no_grad():
            next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


def test_rounds_in_which_nothing_is_accepted_are_said_and_stop_the_run(stackoverflow, trainer_factory, caplog) -> None:
    import logging

    from lightning_fedpeft import NoUpdateAccepted
    from lightning_fedpeft.callbacks.round_log import progress_line

    data = stackoverflow(num_clients=4, max_train_examples=48, max_val_examples=8, max_test_examples=8)

    def fit(max_empty_rounds: int) -> tuple[RoundSync, dict, dict]:
        pl.seed_everything(0)
        model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=1, method="adapter", depth=1, width=4)
        start = trainable_state(model)
        sync = RoundSync(clients_per_round=2, local_steps=1, seed=0, max_empty_rounds=max_empty_rounds)
        trainer = trainer_factory(max_epochs=4, callbacks=[_DivergeEveryClient(), sync], limit_val_batches=0)
        with caplog.at_level(logging.WARNING, logger="lightning_fedpeft"):
            try:
                trainer.fit(model, datamodule=data)
            except NoUpdateAccepted as err:
                return sync, start | {"error": str(err)}, trainable_state(model)
        return sync, start, trainable_state(model)

    sync, start, end = fit(max_empty_rounds=2)
    message = start.pop("error")
    assert [int(r["clients"]) for r in sync.history] == [0, 0]  # stopped after the second empty round
    assert "2 rounds in a row (rounds 0-1)" in message and "non-finite values" in message
    assert "federation.max_empty_rounds=2" in message
    assert all(torch.equal(start[k], end[k]) for k in start)  # the global model never changed
    said = [r.getMessage() for r in caplog.records if "accepted no update" in r.getMessage()]
    assert len(said) == 2 and all("client" in m and "non-finite" in m for m in said)
    assert "NO UPDATE ACCEPTED" in progress_line(sync.history, 4)

    caplog.clear()
    sync, _, _ = fit(max_empty_rounds=0)  # 0: the run goes on to max_epochs, saying so every round
    assert [int(r["clients"]) for r in sync.history] == [0, 0, 0, 0]
    assert sum("accepted no update" in r.getMessage() for r in caplog.records) == 4


def test_why_rounds_were_empty_rides_in_the_checkpoint(stackoverflow, trainer_factory, tmp_path) -> None:
    """A run resumed after an empty round still says why that round was empty when it stops."""
    from lightning_fedpeft import NoUpdateAccepted

    data = stackoverflow(num_clients=4, max_train_examples=48, max_val_examples=8, max_test_examples=8)
    pl.seed_everything(0)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=1, method="adapter", depth=1, width=4)

    def trainer(rounds: int, max_empty_rounds: int) -> pl.Trainer:
        sync = RoundSync(clients_per_round=2, local_steps=1, seed=0, max_empty_rounds=max_empty_rounds)
        return trainer_factory(max_epochs=rounds, callbacks=[_DivergeEveryClient(), sync], limit_val_batches=0)

    first = trainer(1, max_empty_rounds=0)
    first.fit(model, datamodule=data)
    first.save_checkpoint(tmp_path / "empty.ckpt")
    with pytest.raises(NoUpdateAccepted, match=r"rounds 0-1\), .*round 0: .*non-finite.*; round 1: .*non-finite"):
        trainer(4, max_empty_rounds=2).fit(model, datamodule=data, ckpt_path=tmp_path / "empty.ckpt")
