"""FedAdapter x FedARA (DepthRankUpgrade): dormant modules, growth that keeps the function, allocation, a run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FedPEFTModule, RoundSync, SetupError
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.depth_ranks import DepthRankStrategy, DepthRankUpgrade, StateCost
from lightning_fedpeft.fedadapter.strategy import DepthCosts
from lightning_fedpeft.state import trainable_state
from lightning_fedpeft.tuners.svd import state_ranks, triplet_keys


def _initial(layers: int = 3, rank: int = 4) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(layers):
        e, a, b = triplet_keys(f"model.encoder.layer.{i}.query")
        state[e], state[a], state[b] = torch.zeros(rank, 1), torch.randn(rank, 2), torch.randn(2, rank)
    return state | {"model.classifier.weight": torch.zeros(2)}


def test_depth_gates_what_travels_and_growth_wakes_modules_as_built() -> None:
    initial = _initial()
    strategy = DepthRankStrategy(2, initial, num_layers=3, start_depth=1, target_rank=1.0, window_s=1.0)
    shallow, deeper = strategy.packed(1), strategy.packed(2)
    assert state_ranks(shallow) == {f"model.encoder.layer.{i}.query": r for i, r in enumerate([0, 0, 4])}
    assert state_ranks(deeper) == {f"model.encoder.layer.{i}.query": r for i, r in enumerate([0, 4, 4])}
    # The woken module carries the triplets it was built with; its Λ is 0, so the grown model computes the same.
    e, a, _ = triplet_keys("model.encoder.layer.1.query")
    assert torch.equal(deeper[a], initial[a]) and not deeper[e].any()


def test_only_scored_live_triplets_are_masked_down_to_the_windows_budget() -> None:
    strategy = DepthRankStrategy(2, _initial(), 3, start_depth=2, target_rank=1.0, warmup_windows=0, decay_windows=2)
    top, mid = "model.encoder.layer.2.query", "model.encoder.layer.1.query"
    strategy.scores[top] = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    strategy.scored[top][:] = True  # the middle module was woken and not trained yet: not maskable
    # After 1 of 2 decay windows: 1 + 3 * (1/2)^3 = 1.375 per module, 2 live modules -> 3 triplets (rounded).
    assert strategy.rank_per_module(1) == pytest.approx(1.375)
    assert strategy.allocate(depth=2, windows_done=1) == 3  # 8 active, budget 3: the scored top module gives 3
    assert strategy.masks[top].tolist() == [True, False, False, False] and strategy.masks[mid].all()
    assert strategy.allocate(depth=2, windows_done=2) == 0  # nothing scored is left to mask


def test_on_a_fleet_trial_groups_are_drawn_within_device_classes_and_costed_by_state() -> None:
    devices = ["rpi4b"] * 6 + ["tx2"] * 6  # shares 1/2, 1/2: of 2 per group, one each
    strategy = DepthRankStrategy(2, _initial(), 3, start_depth=1, window_s=1.0, seed=0, client_devices=devices)
    strategy.validate(len(devices))
    strategy.initialize(_initial())
    asked = []
    while queries := strategy.queries():
        for query in queries:
            # Costs are asked per state (answered with the slowest device's seconds), not per client depth.
            assert not isinstance(query, DepthCosts), "no per-client depth in the composed algorithm"
            asked.append(query)
            strategy.answer(query, 0.5)  # seconds for a cost; the start accuracy for the evaluation
    assert {q.config[0] for q in asked if isinstance(q, StateCost)} == {1, 2}
    assert strategy.group_mix() == {"rpi4b": 1, "tx2": 1}
    for trial in range(len(strategy.trials)):
        strategy.phase = trial
        plan = strategy.configure_round(trial, len(devices))
        assert sorted(devices[c] for c in plan.client_ids) == ["rpi4b", "tx2"], "every group has the fleet's mix"
        assert all("train_depth" not in told for told in plan.instructions.values())


def _run(data, trainer_factory, epochs: int, ckpt: str | None = None, **kw):
    pl.seed_everything(0)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=4, lr=5e-3)
    sync = RoundSync(clients_per_round=2, seed=0, eval_every=10, cost_model=CostModel())
    upgrade = DepthRankUpgrade(start_depth=1, window_s=0.1, max_val_batches=2, warmup_windows=0, decay_windows=2)
    trainer = trainer_factory(max_epochs=epochs, callbacks=[sync, upgrade], limit_val_batches=0, **kw)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return model, sync, upgrade, trainer


def test_a_run_grows_depth_allocates_ranks_and_resumes_bit_identically(stackoverflow, trainer_factory, tmp_path: Path):
    data = stackoverflow(num_clients=12, max_train_examples=240, max_val_examples=32, max_test_examples=16)
    model, sync, upgrade, trainer = _run(data, trainer_factory, epochs=8)
    rows, final = sync.history, trainable_state(model)
    assert len(upgrade.decisions) >= 2 and any(d.winner == "deeper" for d in upgrade.decisions)
    assert rows[-1]["active_ranks"] < 4 * rows[-1]["live_modules"], "the ranks were allocated down"
    # A round at depth 1 (layer 0's modules dormant, frozen) costs less than at depth 2 under the same mask:
    # backward stops above the dormant layer. Asked as the server asks it.
    strategy = upgrade.strategy
    shallow, deep = (StateCost((d, 4), state=strategy.packed(d)) for d in (1, 2))
    assert upgrade.answer_query(shallow, trainer, model) < upgrade.answer_query(deep, trainer, model)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    # Stopped after 4 rounds and resumed: the same model, bit for bit, and the same decisions.
    _, _, _, trainer_a = _run(data, trainer_factory, epochs=4)
    ckpt = tmp_path / "depth_ranks.ckpt"
    trainer_a.save_checkpoint(ckpt)
    model_b, _, upgrade_b, _ = _run(data, trainer_factory, epochs=8, ckpt=str(ckpt))
    assert [d.winner for d in upgrade_b.decisions] == [d.winner for d in upgrade.decisions]
    resumed = trainable_state(model_b)
    assert set(final) == set(resumed) and all(torch.equal(final[k], resumed[k]) for k in final)
    assert state_ranks(resumed) == state_ranks(final)


def test_bad_setups_are_refused_before_training(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=8, max_test_examples=8)
    lora = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="lora", rank=2)
    trainer = trainer_factory(
        max_epochs=2, callbacks=[RoundSync(clients_per_round=1, cost_model=CostModel()), DepthRankUpgrade()]
    )
    with pytest.raises(SetupError, match="method='svd'"):
        trainer.fit(lora, datamodule=data)
    svd = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=2)
    trainer = trainer_factory(max_epochs=2, callbacks=[RoundSync(clients_per_round=1), DepthRankUpgrade()])
    with pytest.raises(SetupError, match="needs federation.cost_model"):
        trainer.fit(svd, datamodule=data)
    trainer = trainer_factory(
        max_epochs=2,
        callbacks=[RoundSync(clients_per_round=1, cost_model=CostModel()), DepthRankUpgrade(start_depth=3)],
    )
    with pytest.raises(SetupError, match=r"start_depth=3 must be within 1..2"):
        trainer.fit(svd, datamodule=data)
