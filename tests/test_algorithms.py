"""The algorithm interface: RoundSync takes its algorithms whatever their order, and refuses bad mixes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import (
    FederatedAlgorithm,
    FedPEFTModule,
    ModulePruning,
    ProgressiveUpgrade,
    RankAllocation,
    RoundSync,
    SetupError,
)
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.state import trainable_state
from lightning_fedpeft.strategy import FedAvg, Query

MEASURED = ("train_time_s", "round_time_s", "step_time_ms", "peak_rss_mb", "saved_activation_mb")


def _fit(data: Any, trainer_factory: Any, method: str, algorithms: list, before: bool, **sync: Any) -> tuple:
    pl.seed_everything(0)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method=method, depth=2, rank=4, lr=5e-3)
    round_sync = RoundSync(clients_per_round=2, seed=0, eval_every=10, **sync)
    callbacks = [*algorithms, round_sync] if before else [round_sync, *algorithms]
    trainer_factory(max_epochs=4, callbacks=callbacks, limit_val_batches=0).fit(model, datamodule=data)
    rows = [{k: v for k, v in row.items() if k not in MEASURED} for row in round_sync.history]
    return trainable_state(model), rows


@pytest.mark.parametrize("algorithm", ["fedara", "fedadapter"])
def test_algorithm_callbacks_before_or_after_round_sync_give_the_same_run(
    algorithm: str, stackoverflow, trainer_factory
) -> None:
    data = stackoverflow(num_clients=8, max_train_examples=160, max_val_examples=32, max_test_examples=32)
    runs = []
    for before in (True, False):
        if algorithm == "fedara":
            algorithms = [RankAllocation(target_rank=0.5, warmup_rounds=1, final_rounds=1), ModulePruning()]
            runs.append(_fit(data, trainer_factory, "svd", algorithms, before))
        else:
            upgrade = ProgressiveUpgrade(start_depth=0, window_rounds=1)
            runs.append(_fit(data, trainer_factory, "adapter", [upgrade], before, cost_model=CostModel("tx2")))
    (state_a, rows_a), (state_b, rows_b) = runs
    assert list(state_a) == list(state_b) and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert rows_a == rows_b
    if algorithm == "fedara":  # the algorithm really ran (masks fell, modules left)
        assert rows_a[-1]["active_ranks"] < rows_a[0]["active_ranks"] and rows_a[-1]["live_modules"] < 12
    else:
        assert {row["trial_depth"] for row in rows_a} == {0.0, 1.0}


class _AsksAQuestion(FedAvg):
    def queries(self) -> list[Query]:
        return [Query()]


class _BringsAStrategy(FederatedAlgorithm):
    def __init__(self, extra_clients: int = 0) -> None:
        self.extra_clients = extra_clients

    def configure(self, run: Any) -> FedAvg:
        return FedAvg(run.clients_per_round + self.extra_clients, seed=run.seed)


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        (lambda: [RankAllocation(), _BringsAStrategy()], "one server strategy.*RankAllocation and _BringsAStrategy"),
        (lambda: [_BringsAStrategy(1)], r"clients_per_round=2 differs from the 3 the strategy samples"),
        (lambda: [ModulePruning()], "ModulePruning needs the RankAllocation callback"),
        (lambda: [ProgressiveUpgrade(clients_per_group=5)], r"upgrade.clients_per_group=5 differs from federation"),
    ],
)
def test_bad_mixes_of_algorithms_are_refused_before_training(
    callbacks: Any, message: str, stackoverflow, trainer_factory
) -> None:
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=16, max_test_examples=16)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=2, depth=1)
    if "clients_per_group" in message:
        model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=1)
    before = trainable_state(model)
    sync = RoundSync(clients_per_round=2, cost_model=CostModel("tx2"))
    with pytest.raises(SetupError, match=message):
        trainer_factory(max_epochs=6, callbacks=[sync, *callbacks()]).fit(model, datamodule=data)
    assert all(torch.equal(before[k], v) for k, v in trainable_state(model).items()), "nothing trained"
    assert "train_dataloader" not in data.__dict__  # the data module is left as it was found


def test_a_strategy_given_to_round_sync_and_one_an_algorithm_brings_are_refused(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=16, max_test_examples=16)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=2)
    sync = RoundSync(clients_per_round=2, strategy=FedAvg(2))
    with pytest.raises(SetupError, match=r"RankAllocation and RoundSync\(strategy=...\) each bring one"):
        trainer_factory(max_epochs=6, callbacks=[sync, RankAllocation()]).fit(model, datamodule=data)


def test_a_query_no_algorithm_answers_is_an_error(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=16, max_test_examples=16)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, depth=1)
    sync = RoundSync(clients_per_round=2, strategy=_AsksAQuestion(2))
    with pytest.raises(RuntimeError, match="no algorithm callback answers it"):
        trainer_factory(max_epochs=1, callbacks=[sync]).fit(model, datamodule=data)
