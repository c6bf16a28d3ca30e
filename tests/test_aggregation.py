"""Aggregation rules and server optimizers: by hand, against poisoned clients, and client-level DP."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_user_module import NUM_CLIENTS, SEED, UserData, UserModule

from lightning_fedpeft import FedPEFTModule, RoundSync, SetupError
from lightning_fedpeft.aggregation import (
    CoordinateMedian,
    DPGaussian,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    NormBounded,
    TrimmedMean,
)
from lightning_fedpeft.attacks import ScaledUpdateAttack
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.fedadapter import ProgressiveUpgrade
from lightning_fedpeft.fedara import RankAllocation
from lightning_fedpeft.protocol import ClientUpdate
from lightning_fedpeft.strategy import FedAvg

GLOBAL = {"w": torch.zeros(3)}


def _updates(*values: list[float], examples: list[int] | None = None) -> list[ClientUpdate]:
    examples = examples or [1] * len(values)
    return [
        ClientUpdate(i, 0, n, {"w": torch.tensor(v)}) for i, (v, n) in enumerate(zip(values, examples, strict=True))
    ]


def _bound(rule: Any, clients: int, num_clients: int = 10) -> Any:
    rule.bind(clients, num_clients, seed=0)
    return rule


def test_median_and_trimmed_mean_by_hand() -> None:
    updates = _updates([1.0, -5.0, 0.0], [2.0, 0.0, 0.0], [100.0, 1.0, 3.0], [4.0, 2.0, 1.0])
    # Per coordinate, sorted: [1, 2, 4, 100], [-5, 0, 1, 2], [0, 0, 1, 3]
    median = _bound(CoordinateMedian(), 4).combine(0, GLOBAL, updates)["w"]
    assert median.tolist() == [3.0, 0.5, 0.5]  # the mean of the two middle values
    trimmed = _bound(TrimmedMean(trim=1), 4).combine(0, GLOBAL, updates)["w"]
    assert trimmed.tolist() == [3.0, 0.5, 0.5]  # (2 + 4) / 2, (0 + 1) / 2, (0 + 1) / 2
    five = [*updates, *_updates([-100.0, 9.0, 9.0])]
    assert _bound(TrimmedMean(trim=1), 5).combine(0, GLOBAL, five)["w"].tolist() == [
        pytest.approx((1 + 2 + 4) / 3),
        pytest.approx((0 + 1 + 2) / 3),
        pytest.approx((0 + 1 + 3) / 3),
    ]
    with pytest.raises(ValueError, match=r"trim=2 drops 4 of the 4 clients"):
        _bound(TrimmedMean(trim=2), 4)


def test_norm_bounded_clips_each_change_then_weights_by_examples() -> None:
    updates = _updates([3.0, 4.0, 0.0], [0.0, 0.0, 1.0], examples=[1, 3])  # norms 5 and 1
    rule = _bound(NormBounded(max_norm=2.0), 2)
    out = rule.combine(0, GLOBAL, updates)["w"]
    # Client 0 scaled to norm 2: [1.2, 1.6, 0]; client 1 kept. Weights 1/4 and 3/4.
    torch.testing.assert_close(out, torch.tensor([0.3, 0.4, 0.75]))
    assert rule.metrics() == {"clipped_clients": 1.0}  # the rule that clipped says how many it clipped


def test_server_optimizers_by_hand() -> None:
    def two_steps(optimizer: Any) -> list[torch.Tensor]:
        state, seen = {"w": torch.tensor([1.0])}, []
        for target in (3.0, 2.0):  # the clients' average: pseudo-gradients 2.0, then 2.0 - state
            state = optimizer.step(state, {"w": torch.tensor([target])})
            seen.append(state["w"].clone())
        return seen

    # FedAvgM lr 1, momentum 0.5: v = 2, state 3; v = 0.5*2 + (2-3) = 0, state 3.
    assert [x.item() for x in two_steps(FedAvgM(lr=1.0, momentum=0.5))] == [3.0, 3.0]
    # FedAdam lr 0.1, b1 0.5, b2 0.5, tau 0.1: m = 1, v = 2, step 0.1*1/(sqrt 2+0.1)
    (a, b) = two_steps(FedAdam(lr=0.1, beta1=0.5, beta2=0.5, tau=0.1))
    first = 1.0 + 0.1 * 1.0 / (math.sqrt(2.0) + 0.1)
    assert a.item() == pytest.approx(first)
    d = 2.0 - first
    m, v = 0.5 * 1.0 + 0.5 * d, 0.5 * 2.0 + 0.5 * d * d
    assert b.item() == pytest.approx(first + 0.1 * m / (math.sqrt(v) + 0.1))
    # FedYogi: v = 0 - 0.5*4*sign(0 - 4) = 2 (as Adam here); then v = 2 - 0.5 d^2 sign(2 - d^2)
    (a, b) = two_steps(FedYogi(lr=0.1, beta1=0.5, beta2=0.5, tau=0.1))
    assert a.item() == pytest.approx(first)
    v = 2.0 - 0.5 * d * d * math.copysign(1.0, 2.0 - d * d)
    assert b.item() == pytest.approx(first + 0.1 * m / (math.sqrt(v) + 0.1))
    # FedAdagrad: v = 4, then 4 + d^2
    (a, b) = two_steps(FedAdagrad(lr=0.1, beta1=0.5, tau=0.1))
    first = 1.0 + 0.1 * 1.0 / (2.0 + 0.1)
    d = 2.0 - first
    assert a.item() == pytest.approx(first)
    assert b.item() == pytest.approx(first + 0.1 * (0.5 + 0.5 * d) / (math.sqrt(4.0 + d * d) + 0.1))


def test_server_optimizer_state_rides_in_the_strategy_state() -> None:
    strategy = FedAvg(2)
    strategy.use_server_optimizer(FedAdam(lr=0.1))
    strategy.validate(4)
    strategy.aggregate(0, {"w": torch.zeros(2)}, _updates([1.0, 1.0], [3.0, 1.0]))
    restored = FedAvg(2)
    restored.use_server_optimizer(FedAdam(lr=0.1))
    restored.load_state_dict(strategy.state_dict())
    for kind in ("m", "v"):
        torch.testing.assert_close(
            restored.server_optimizer.moments[kind]["w"], strategy.server_optimizer.moments[kind]["w"]
        )


# -- a poisoned client in a real federated run ---------------------------------------------------------------------
POOL = 5  # one poisoned client of five, all of them in every round


def _run(aggregator: Any, poison: float | None) -> torch.Tensor:
    pl.seed_everything(0)
    module = UserModule()
    sync = RoundSync(clients_per_round=POOL, num_clients=POOL, local_steps=3, seed=SEED, aggregator=aggregator)
    callbacks = [sync] + ([ScaledUpdateAttack(clients=[0], factor=poison)] if poison is not None else [])
    trainer = pl.Trainer(
        max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=UserData())
    return module.net[2].weight.detach().clone()


@pytest.mark.parametrize("factor", [-10.0, 50.0])  # sign-flipped, scaled
def test_median_and_trimmed_mean_keep_a_poisoned_client_from_moving_the_model(factor: float) -> None:
    moved = {}
    for name, make in (("mean", lambda: None), ("median", CoordinateMedian), ("trimmed", lambda: TrimmedMean(trim=1))):
        clean, poisoned = _run(make(), None), _run(make(), factor)
        moved[name] = float((poisoned - clean).norm())
    assert moved["mean"] > 2.0  # FedAvg follows the poisoned client far away (8x its clean travel, and more)
    # Measured: 0.22 / 0.26 against FedAvg's 2.14 (-10), 0.07 / 0.08 against 4.35 (50); with five clients of
    # some 8 examples each, the honest updates differ that much among themselves.
    assert moved["median"] < moved["mean"] / 5 and moved["trimmed"] < moved["mean"] / 5, moved


def test_an_attack_with_bad_settings_is_refused() -> None:
    for kwargs, word in (({"clients": [-1]}, "client ids"), ({"clients": [0], "factor": math.inf}, "finite")):
        with pytest.raises(ValueError, match=word):
            ScaledUpdateAttack(**kwargs)


# -- client-level differential privacy ------------------------------------------------------------------------------
def test_dp_noise_has_the_configured_scale_and_changes_are_clipped() -> None:
    rule = _bound(DPGaussian(clip_norm=2.0, noise_multiplier=1.5), 4, num_clients=8)
    big = {"w": torch.zeros(200_000)}
    same = [ClientUpdate(i, 0, 1, {"w": torch.zeros(200_000)}) for i in range(4)]  # no change: all noise
    noise = rule.combine(0, big, same)["w"]
    assert noise.std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.01) and abs(noise.mean().item()) < 0.01
    rule = _bound(DPGaussian(clip_norm=1.0, noise_multiplier=1e-9), 2, num_clients=4)
    out = rule.combine(0, {"w": torch.zeros(2)}, _updates([30.0, 40.0], [0.0, 0.5]))["w"]
    torch.testing.assert_close(out, torch.tensor([0.3, 0.65]), atol=1e-6, rtol=0)  # ([0.6, 0.8] + [0, 0.5]) / 2
    assert rule.metrics()["clipped_clients"] == 1.0


def test_dp_epsilon_matches_the_gaussian_mechanisms_known_value() -> None:
    # Every client every round (rate 1): the Gaussian mechanism's RDP is alpha / (2 sigma^2) a round, and
    # (epsilon, delta) follows from it by Balle et al. (2020) over Opacus' orders: computed here by hand.
    sigma, rounds, delta = 2.0, 10, 1e-5
    rule = _bound(DPGaussian(noise_multiplier=sigma, delta=delta), 5, num_clients=5)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def by_hand(alpha: float) -> float:
        rdp = rounds * alpha / (2 * sigma**2)
        return rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)

    assert rule.epsilon(rounds) == pytest.approx(min(by_hand(a) for a in orders), rel=1e-6)
    subsampled = _bound(DPGaussian(noise_multiplier=sigma, delta=delta), 1, num_clients=100)
    assert subsampled.epsilon(rounds) < rule.epsilon(rounds) / 10  # sampling 1 client in 100 amplifies privacy


def test_a_run_stops_at_its_privacy_budget_and_logs_epsilon_every_round() -> None:
    rule = DPGaussian(clip_norm=1.0, noise_multiplier=1.0, max_epsilon=4.0)
    sync = RoundSync(clients_per_round=2, num_clients=NUM_CLIENTS, local_steps=2, seed=SEED, aggregator=rule)
    trainer = pl.Trainer(
        max_epochs=50, callbacks=[sync], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(UserModule(), datamodule=UserData())
    spent = [row["dp_epsilon"] for row in sync.history]
    assert len(spent) < 50 and spent == sorted(spent) and spent[-1] <= 4.0
    assert rule.epsilon(len(spent) + 1) > 4.0  # one more round would have passed the budget


def test_combinations_a_strategy_cannot_run_are_refused_before_training(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=6, max_train_examples=60, max_val_examples=16, max_test_examples=16)
    svd = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=2)
    for settings, message in (
        ({"server_optimizer": FedAdam()}, "FedAdam does not work with RankAllocation"),
        ({"aggregator": DPGaussian()}, "DPGaussian does not work with RankAllocation"),
    ):
        trainer = trainer_factory(
            max_epochs=6, callbacks=[RoundSync(clients_per_round=2, **settings), RankAllocation()]
        )
        with pytest.raises(SetupError, match=message):
            trainer.fit(svd, datamodule=data)
    adapter = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=1)
    for settings, message in (
        ({"server_optimizer": FedYogi()}, "FedYogi does not work with ProgressiveUpgrade"),
        ({"aggregator": DPGaussian()}, "DPGaussian does not work with ProgressiveUpgrade"),
    ):
        sync = RoundSync(clients_per_round=2, cost_model=CostModel("tx2"), **settings)
        with pytest.raises(SetupError, match=message):
            trainer_factory(max_epochs=3, callbacks=[sync, ProgressiveUpgrade()]).fit(adapter, datamodule=data)
    # A robust rule does work with both (it only changes how updates are combined).
    sync = RoundSync(clients_per_round=3, aggregator=TrimmedMean(1))
    allocation = RankAllocation(target_rank=1.0, warmup_rounds=1, final_rounds=1)
    trainer = trainer_factory(max_epochs=4, callbacks=[sync, allocation])
    trainer.fit(FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=2), datamodule=data)
    assert len(sync.history) == 4 and sync.history[-1]["active_ranks"] < sync.history[0]["active_ranks"]
    sync = RoundSync(clients_per_round=3, cost_model=CostModel("tx2"), aggregator=TrimmedMean(1))  # 2 groups x 3
    upgrade = ProgressiveUpgrade(window_rounds=1, candidates=["shallow", "deeper"])
    trainer_factory(max_epochs=4, callbacks=[sync, upgrade]).fit(adapter, datamodule=data)
    assert len(sync.history) == 4 and upgrade.decisions  # trial windows ran and decided under the robust rule
