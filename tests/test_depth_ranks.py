"""FedAdapter x FedARA (DepthRankUpgrade): dormant modules, growth that keeps the function, allocation, a run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FedPEFTModule, RoundSync, SetupError
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.depth_ranks import DepthRankStrategy, DepthRankUpgrade, StateCost
from lightning_fedpeft.depth_ranks.strategy import StateDepthCosts
from lightning_fedpeft.fedadapter.strategy import DepthCosts
from lightning_fedpeft.fedara.strategy import IMPORTANCE
from lightning_fedpeft.fleet import Fleet
from lightning_fedpeft.protocol import ClientUpdate
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


def _answer_all(strategy: DepthRankStrategy, rpi_depth: int | None = None) -> list:
    """Answer the window's planning questions: per train depth, the rpi4b fits the round's budget only at
    ``rpi_depth`` or less; 0.5 s for a state's cost; 0.5 for the start accuracy."""
    asked = []
    while queries := strategy.queries():
        for query in queries:
            asked.append(query)
            if isinstance(query, StateDepthCosts):
                depths = range(query.config[0], 0, -1)
                slow = {d: 1.0 if rpi_depth is None or d <= rpi_depth else 9.0 for d in depths}
                strategy.answer(
                    query, [{"depth": d, "seconds": {"rpi4b": slow[d], "tx2": 1.0}, "memory_bytes": 1} for d in depths]
                )
            else:
                strategy.answer(query, 0.5)
    return asked


def test_on_a_fleet_trial_groups_are_drawn_within_device_classes_and_every_client_gets_a_depth() -> None:
    devices = ["rpi4b"] * 6 + ["tx2"] * 6  # shares 1/2, 1/2: of 2 per group, one each
    strategy = DepthRankStrategy(2, _initial(), 3, start_depth=1, window_s=1.0, seed=0, client_devices=devices)
    strategy.validate(len(devices))
    strategy.initialize(_initial())
    asked = _answer_all(strategy, rpi_depth=1)
    # Costs are asked per train depth, with the state each candidate trains (its depth, the window's mask).
    costs = [q for q in asked if isinstance(q, StateDepthCosts)]
    assert {q.config[0] for q in costs} == {1, 2}
    assert all(state_ranks(q.state)["model.encoder.layer.1.query"] == (4 if q.config[0] == 2 else 0) for q in costs)
    assert strategy.group_mix() == {"rpi4b": 1, "tx2": 1}
    depths = [t.depth for t in strategy.trials]
    assert depths == [1, 2]
    for trial in range(len(strategy.trials)):
        strategy.phase = trial
        plan = strategy.configure_round(trial, len(devices))
        assert sorted(devices[c] for c in plan.client_ids) == ["rpi4b", "tx2"], "every group has the fleet's mix"
        got = {devices[c]: told["train_depth"] for c, told in plan.instructions.items()}
        # The Pi's budget (the median participant's time at the trial's depth) fits only the top layer.
        assert got == {"rpi4b": 1, "tx2": depths[trial]}

    # Off: costs per state (the slowest device's), every client the whole trial depth.
    uniform = DepthRankStrategy(2, _initial(), 3, 1, window_s=1.0, client_devices=devices, per_client_depth=False)
    uniform.validate(len(devices))
    uniform.initialize(_initial())
    asked = _answer_all(uniform)
    assert not any(isinstance(q, DepthCosts) for q in asked) and {
        q.config[0] for q in asked if isinstance(q, StateCost)
    } == {1, 2}
    plan = uniform.configure_round(0, len(devices))
    assert all("train_depth" not in told for told in plan.instructions.values())


def test_a_module_and_its_importance_are_averaged_over_the_clients_that_trained_it() -> None:
    # Trial depth 2 (layers 1 and 2 live); the Pi trains only layer 2, the TX2 both. Against a hand average.
    devices = ["rpi4b"] * 2 + ["tx2"] * 2
    initial = _initial()
    strategy = DepthRankStrategy(2, initial, 3, start_depth=2, window_s=1.0, seed=0, client_devices=devices)
    strategy.validate(len(devices))
    strategy.initialize(initial)
    _answer_all(strategy, rpi_depth=1)
    plan = strategy.configure_round(0, len(devices))
    (pi,) = [c for c in plan.client_ids if devices[c] == "rpi4b"]
    (tx,) = [c for c in plan.client_ids if devices[c] == "tx2"]
    assert plan.instructions[pi]["train_depth"] == 1 and plan.instructions[tx]["train_depth"] == 2
    sent = strategy.packed(2)
    top, mid = "model.encoder.layer.2.query", "model.encoder.layer.1.query"
    _, a_top, _ = triplet_keys(top)
    _, a_mid, _ = triplet_keys(mid)

    def update(client: int, n: int, shift: float, trained_mid: bool) -> ClientUpdate:
        state = {k: v.clone() for k, v in sent.items()}
        state[a_top] = state[a_top] + shift
        if trained_mid:
            state[a_mid] = state[a_mid] + 10 * shift
        importance = {top + IMPORTANCE: torch.full((4,), shift), mid + IMPORTANCE: torch.full((4,), 100 * shift)}
        if not trained_mid:
            importance[mid + IMPORTANCE] = torch.zeros(4)  # what a client that froze it scores
        return ClientUpdate(client_id=client, round=0, state=state, num_examples=n, tensors=importance)

    updates = [update(pi, 30, 1.0, trained_mid=False), update(tx, 10, 2.0, trained_mid=True)]
    bad = update(pi, 30, 1.0, trained_mid=True)
    assert strategy.check_update(bad) is not None and "below the top 1" in strategy.check_update(bad)
    assert all(strategy.check_update(u) is None for u in updates)
    out = strategy.aggregate(0, sent, updates)
    # The top module over both (30:10), the middle one over the TX2 alone: no pull towards the Pi's copy.
    assert torch.allclose(out[a_top], sent[a_top] + (30 * 1.0 + 10 * 2.0) / 40)
    assert torch.allclose(out[a_mid], sent[a_mid] + 20.0)
    assert torch.allclose(strategy._importance[0][top], torch.full((4,), 1.25, dtype=torch.float64))
    assert torch.allclose(strategy._importance[0][mid], torch.full((4,), 200.0, dtype=torch.float64))
    assert strategy.round_metrics()["min_train_depth"] == 1.0


def _run(data, trainer_factory, epochs: int, ckpt: str | None = None, **kw):
    pl.seed_everything(0)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=4, lr=5e-3)
    # On a fleet of Pis and TX2s: trial groups within device classes, and a train depth per client.
    cost = CostModel(fleet=Fleet(fractions={"rpi4b": 0.5, "tx2": 0.5}))
    sync = RoundSync(clients_per_round=2, seed=0, eval_every=10, cost_model=cost)
    upgrade = DepthRankUpgrade(start_depth=1, window_s=0.1, max_val_batches=2, warmup_windows=0, decay_windows=2)
    trainer = trainer_factory(max_epochs=epochs, callbacks=[sync, upgrade], limit_val_batches=0, **kw)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return model, sync, upgrade, trainer


def test_a_fleet_run_grows_depth_allocates_ranks_and_resumes_bit_identically(
    stackoverflow, trainer_factory, tmp_path: Path
):
    data = stackoverflow(num_clients=12, max_train_examples=240, max_val_examples=32, max_test_examples=16)
    model, sync, upgrade, trainer = _run(data, trainer_factory, epochs=8)
    rows, final = sync.history, trainable_state(model)
    assert len(upgrade.decisions) >= 2 and any(d.winner == "deeper" for d in upgrade.decisions)
    assert rows[-1]["active_ranks"] < 4 * rows[-1]["live_modules"], "the ranks were allocated down"
    assert any(r.get("min_train_depth", 9) < r["trial_depth"] for r in rows), "a Pi trained fewer layers"
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
