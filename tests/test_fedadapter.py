"""FedAdapter: function-preserving growth, the activation cache, trial groups, and checkpointed state."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FedPEFTModule, RoundSync
from lightning_fedpeft.cache import ActivationCache
from lightning_fedpeft.cost import CostModel
from lightning_fedpeft.fedadapter import EvaluateState, GrowState, ProgressiveUpgrade, RoundCost, TrialGroupStrategy
from lightning_fedpeft.protocol import ClientUpdate
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import trainable_state


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (4, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[3, 5:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def _trained_adapter_module(
    depth: int, width: int, cache_mb: float | None = None, cache_dtype: str = "float16"
) -> FedPEFTModule:
    torch.manual_seed(0)
    module = FedPEFTModule(
        num_labels=3,
        num_hidden_layers=2,
        method="adapter",
        depth=depth,
        width=width,
        activation_cache_mb=cache_mb,
        activation_cache_dtype=cache_dtype,
    )
    with torch.no_grad():  # stand-in for training: every adapter and the head move away from their init
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def test_widening_and_deepening_preserve_the_function() -> None:
    module = _trained_adapter_module(depth=1, width=8)
    batch = _batch()
    before = module.model(**batch).logits
    module.resize_adapters(1, 16)  # wider: trained units kept, new units' up-projection is zero
    assert module.adapter_config == (1, 16)
    torch.testing.assert_close(module.model(**batch).logits, before, rtol=0, atol=1e-5)
    module.resize_adapters(2, 16)  # deeper: the new adapter starts as the identity
    assert module.adapter_config == (2, 16)
    torch.testing.assert_close(module.model(**batch).logits, before, rtol=0, atol=1e-5)
    # The grown state names the new configuration; a module in another configuration adopts it on load.
    state = trainable_state(module)
    adapters = [k for k in state if ".adapter." in k]
    assert len(adapters) == 2 * 4 and all(state[k].shape[0] == 16 for k in adapters if k.endswith("down.weight"))
    other = _trained_adapter_module(depth=1, width=8)
    other.set_trainable_state(state)
    assert other.adapter_config == (2, 16)
    torch.testing.assert_close(other.model(**batch).logits, before, rtol=0, atol=1e-5)
    # And the new units do train: they get gradients.
    module.train()
    module.model(**batch).loss.backward()
    widened = module.model.bert.encoder.layer[1].output.adapter.up.weight
    assert widened.grad is not None and widened.grad[:, 8:].abs().sum() > 0
    added = module.model.bert.encoder.layer[0].output.adapter.up.weight
    assert added.grad is not None and added.grad.abs().sum() > 0


# float32 storage: the same numbers up to summation order; float16 (the default): up to its rounding.
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-6), "float16": (1e-3, 2e-2, 1e-4)}  # loss atol, grad rtol, grad atol


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("depth", [0, 1])
def test_cached_and_uncached_paths_give_the_same_loss(depth: int, dtype: str) -> None:
    module = _trained_adapter_module(depth=depth, width=8, cache_mb=16, cache_dtype=dtype)
    loss_atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    cache = module.activation_cache
    assert cache.dtype == getattr(torch, dtype)
    batch = _batch()
    expected = module.model(**batch).loss
    first = cache(module.model, batch)  # fills the cache
    second = cache(module.model, batch)  # runs only the layers above the frozen boundary
    assert cache.misses == 4 and cache.hits == 4 and len(cache) == 4
    assert cache.last["boundary"] == 2 - depth
    # Stored unpadded at the storage dtype's size: tokens x hidden x bytes per element.
    tokens = int(batch["attention_mask"].sum())
    assert cache.nbytes == tokens * module.model.config.hidden_size * getattr(torch, dtype).itemsize
    torch.testing.assert_close(first.loss, expected, rtol=0, atol=loss_atol)
    torch.testing.assert_close(second.loss, expected, rtol=0, atol=loss_atol)
    # The gradients of the trainable top are the same too.
    params = [p for p in module.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(module.model(**batch).loss, params)
    g_cached = torch.autograd.grad(cache(module.model, batch).loss, params)
    for a, b in zip(g_ref, g_cached, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol)


def test_cache_is_bounded_and_dropped_when_depth_grows() -> None:
    module = _trained_adapter_module(depth=1, width=8, cache_mb=16)
    row_bytes = 16 * module.model.config.hidden_size * 2  # float16 storage
    cache = ActivationCache(max_mb=2.5 * row_bytes / 2**20)  # room for two full-length rows
    batch = _batch()
    cache(module.model, batch)
    assert cache.nbytes <= cache.max_bytes and cache.evictions >= 1
    kept = len(cache)
    assert 0 < kept < 4
    module.resize_adapters(2, 8)  # deeper: entries cached for boundary 1 are stale
    assert cache.invalidate_above(0) == kept and len(cache) == 0 and cache.nbytes == 0
    expected = module.model(**batch).loss
    torch.testing.assert_close(cache(module.model, batch).loss, expected)  # nothing frozen: the plain path
    assert cache.last["boundary"] == 0 and len(cache) == 0


def test_a_client_that_freezes_live_adapters_gets_no_stale_rows_from_the_cache() -> None:
    # A fleet client of depth 2 that trains only the top adapter freezes layer 0's, which the others train: a
    # row cached above it would go stale once that adapter moves. With stable_boundary the cache serves from
    # layer 0, and the frozen adapter runs forward as it now is.
    module = _trained_adapter_module(depth=2, width=8, cache_mb=16, cache_dtype="float32")
    cache, batch = module.activation_cache, _batch()
    bottom = list(module.adapter_injection.adapters.values())[0]
    for p in bottom.parameters():
        p.requires_grad_(False)  # this client trains only the top adapter
    cache(module.model, batch)  # fills rows at boundary 1 (layer 0 as it was)
    with torch.no_grad():
        for p in bottom.parameters():
            p.add_(0.5)  # another client's round moved it
    expected = module.model(**batch).loss
    stale = cache(module.model, batch).loss
    assert cache.last["boundary"] == 1 and not torch.allclose(stale, expected, atol=1e-4), "the hazard is real"
    cache.stable_boundary = 0
    torch.testing.assert_close(cache(module.model, batch).loss, expected)
    assert cache.last["boundary"] == 0
    # The cost model counts that step from the same boundary: the frozen adapter's layer forward, backward above.
    cost = CostModel()
    capped, _ = cost.step_flops(module.model, batch, cached=True, boundary_cap=0)
    above, _ = cost.step_flops(module.model, batch, cached=True)
    assert capped > above


class _Scripted:
    """Answers the strategy's queries with scripted accuracies and costs, where the model would."""

    def __init__(self, accuracies: list[float], costs: dict[tuple[int, int], float]) -> None:
        self.accuracies = list(accuracies)
        self.costs = costs
        self.grown: list[tuple[int, int]] = []

    def answer(self, query: object) -> object:
        if isinstance(query, EvaluateState):
            return self.accuracies.pop(0)
        if isinstance(query, GrowState):
            self.grown.append(query.config)
            return {"w": torch.full((1,), float(query.config[0] * 100 + query.config[1]))}
        assert isinstance(query, RoundCost)
        return self.costs[query.config]


def _server(strategy: TrialGroupStrategy, script: _Scripted, num_clients: int) -> FederatedServer:
    # A bandwidth so high that a round's simulated time is its clients' compute (1 s each, below).
    server = FederatedServer(strategy, num_clients, cost_model=CostModel("tx2", bandwidth_mbps=1e12))
    server.initialize({"w": torch.zeros(1)})
    _settle(server, script)
    return server


def _settle(server: FederatedServer, script: _Scripted) -> None:
    while queries := server.queries():
        for query in queries:
            server.answer(query, script.answer(query))


def _run_window(server: FederatedServer, script: _Scripted, round0: int) -> list[tuple[str, list[int], dict]]:
    strategy = server.strategy
    plans = []
    for r in range(round0, round0 + sum(t.rounds for t in strategy.trials)):
        plan = server.open_round(r)
        plans.append((strategy.trials[strategy.phase].name, plan.client_ids, plan.instructions))
        for c in plan.client_ids:
            assert server.submit(ClientUpdate(c, r, 10, dict(server.global_state), {"sim_compute_s": 1.0}))
        server.close_round()
        _settle(server, script)
        server.finish_round()
    return plans


def test_trial_groups_split_the_participants_and_the_best_validation_accuracy_wins() -> None:
    # Window 0 from (1, 8): shallow costs 1 s/round, deeper 2, wider 1.5; budget T0 * (4*1 + 1) = 6 s.
    costs = {(1, 8): 1.0, (2, 8): 2.0, (1, 16): 1.5, (2, 16): 2.5, (3, 8): 3.0, (1, 24): 2.0}
    script = _Scripted([0.30, 0.40, 0.55, 0.50], costs)  # start, shallow, deeper, wider
    strategy = TrialGroupStrategy(clients_per_group=2, num_layers=4, start=(1, 8), window_s=1.2, seed=3)
    server = _server(strategy, script, num_clients=10)
    assert [(t.name, t.depth, t.width, t.rounds) for t in strategy.trials] == [
        ("shallow", 1, 8, 6),
        ("deeper", 2, 8, 3),
        ("wider", 1, 16, 4),  # floor(6 / cost): cheaper runs more
    ]
    plans = _run_window(server, script, round0=0)
    # Round j of every group draws from one sample; the groups' slices are disjoint.
    assert all(len(ids) == 2 for _, ids, _ in plans)
    by_group = {name: [ids for n, ids, _ in plans if n == name] for name in ("shallow", "deeper", "wider")}
    for j in range(3):
        a, b, c = (set(by_group[g][j]) for g in ("shallow", "deeper", "wider"))
        assert not (a & b or a & c or b & c)
    # Every client of a group is told its group's configuration (and the decided depth, for its cache).
    trained = {"shallow": (1, 8), "deeper": (2, 8), "wider": (1, 16)}
    for name, ids, told in plans:
        assert sorted(told) == ids
        assert {(t["adapter_depth"], t["adapter_width"], t["decided_depth"]) for t in told.values()} == {
            (*trained[name], 1)
        }
    # Candidates start from the window's model grown to their configuration.
    assert script.grown == [(2, 8), (1, 16)]
    # deeper had the best validation accuracy: everyone continues from its model and configuration.
    assert strategy.config == (2, 8) and server.global_state["w"].item() == 208.0
    (decision,) = strategy.decisions
    assert decision.winner == "deeper" and decision.val_acc == 0.55 and decision.gain == pytest.approx(0.25)
    assert decision.sim_time_h == pytest.approx(3 / 3600)  # the clock advances by the winner's 3 rounds
    assert strategy.sim_time_s == pytest.approx(3.0)
    # The next window is planned from the winner: budget T0 * (4*2 + 1).
    assert [(t.name, t.depth, t.width) for t in strategy.trials] == [
        ("shallow", 2, 8),
        ("deeper", 3, 8),
        ("wider", 2, 16),
    ]
    assert strategy.budget_s() == pytest.approx(1.2 * 9)


def test_a_tie_keeps_the_cheaper_candidate_and_state_round_trips() -> None:
    costs = {(0, 8): 1.0, (1, 8): 2.0}
    script = _Scripted([0.2, 0.5, 0.5], costs)
    kwargs = dict(clients_per_group=1, num_layers=2, start=(0, 8), window_s=2.0, seed=0)
    strategy = TrialGroupStrategy(**kwargs)
    server = _server(strategy, script, num_clients=4)
    assert [t.name for t in strategy.trials] == ["shallow", "deeper"]  # no "wider" at depth 0
    saved = strategy.state_dict()
    _run_window(server, script, round0=0)
    assert strategy.decisions[0].winner == "shallow" and strategy.config == (0, 8)
    restored = TrialGroupStrategy(**kwargs)
    restored.load_state_dict(strategy.state_dict())
    assert restored.state_dict()["decisions"] == strategy.state_dict()["decisions"]
    assert restored.config == strategy.config and restored.sim_time_s == strategy.sim_time_s
    assert [t.name for t in restored.trials] == [t.name for t in strategy.trials]
    assert saved["window"] == 0 and restored.window == 1
    assert restored.queries() == [] and restored.may_stop()  # restored between rounds, with nothing to ask


def test_t0_from_window_rounds_is_that_many_rounds_of_the_start_configuration() -> None:
    script = _Scripted([0.1], {(0, 8): 2.5, (1, 8): 4.0})
    strategy = TrialGroupStrategy(clients_per_group=1, num_layers=2, start=(0, 8), window_rounds=3.0)
    _server(strategy, script, num_clients=4)
    assert strategy.window_s == pytest.approx(7.5) and strategy.budget_s() == pytest.approx(7.5)
    assert [(t.name, t.rounds) for t in strategy.trials] == [("shallow", 3), ("deeper", 1)]


def test_progressive_upgrade_runs_and_its_state_rides_in_the_checkpoint(
    stackoverflow, trainer_factory, tmp_path: Path
) -> None:
    pl.seed_everything(0)
    data = stackoverflow(num_clients=12, max_train_examples=240, max_val_examples=64, max_test_examples=64)

    def build() -> tuple[FedPEFTModule, RoundSync, ProgressiveUpgrade, pl.Trainer]:
        model = FedPEFTModule(
            num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=2, lr=5e-3, activation_cache_mb=64
        )
        sync = RoundSync(clients_per_round=2, seed=0, cost_model=CostModel("tx2", 1.0))
        upgrade = ProgressiveUpgrade(window_rounds=1, start_depth=0, start_width=8)
        trainer = trainer_factory(max_epochs=6, callbacks=[sync, upgrade], limit_val_batches=0)
        return model, sync, upgrade, trainer

    model, sync, upgrade, trainer = build()
    trainer.fit(model, datamodule=data)
    assert upgrade.decisions, "at least one decision window closes in 6 rounds"
    assert all("sim_time_h" in row for row in sync.history)
    # fit returns the last published global model: the configuration of the trial that trains next.
    trial = upgrade.strategy.trials[upgrade.strategy.phase]
    assert model.adapter_config == (trial.depth, trial.width)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    model2, sync2, upgrade2, trainer2 = build()
    trainer2.fit_loop.max_epochs = 6
    trainer2.fit(model2, datamodule=data, ckpt_path=str(ckpt))  # nothing left to train: restores only
    assert upgrade2.strategy.state_dict()["decisions"] == upgrade.strategy.state_dict()["decisions"]
    assert upgrade2.strategy.config == upgrade.strategy.config
    assert upgrade2.strategy.sim_time_s == upgrade.strategy.sim_time_s
    assert sync2.history == sync.history
    assert model2.adapter_config == model.adapter_config


def test_a_simulated_time_budget_ends_fedadapter_only_at_a_decision(stackoverflow, trainer_factory) -> None:
    # The budget is spent after the first round, but the window's other trial groups still train and
    # the winner is chosen before fit ends: a stop mid-window would drop trials with no decision.
    pl.seed_everything(0)
    data = stackoverflow(num_clients=12, max_train_examples=240, max_val_examples=64, max_test_examples=64)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=2, lr=5e-3)
    sync = RoundSync(clients_per_round=2, seed=0, cost_model=CostModel("tx2", 1.0), max_sim_hours=1e-9)
    upgrade = ProgressiveUpgrade(window_rounds=1, start_depth=0, start_width=8)
    trainer = trainer_factory(max_epochs=20, callbacks=[sync, upgrade], limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert len(upgrade.decisions) == 1
    # Every trial of the window ran its rounds (at depth 0 the candidates are the current and the deeper).
    trial_rounds = [int(n) for n in re.findall(r": (\d+) rounds", upgrade.decisions[0].trials)]
    assert len(trial_rounds) >= 2 and len(sync.history) == sum(trial_rounds) > 1
    assert len({(row["trial_depth"], row["trial_width"]) for row in sync.history}) == len(trial_rounds)
    assert "decision_val_acc" in sync.history[-1]
    assert all("decision_val_acc" not in row for row in sync.history[:-1])
    assert sync.history[-1]["sim_time_h"] == pytest.approx(upgrade.decisions[0].sim_time_h)


def test_the_aggregator_of_the_trial_groups_rides_in_the_strategy_state() -> None:
    """FedAdapter averages like FedAvg, as FedARA does, and its aggregator's state is checkpointed with it."""
    from lightning_fedpeft.aggregation import WeightedMean
    from lightning_fedpeft.strategy import FedAvg

    class CountingMean(WeightedMean):
        def __init__(self) -> None:
            self.rounds = 0

        def combine(self, round_idx, global_state, updates):  # noqa: ANN001, ANN201
            self.rounds += 1
            return super().combine(round_idx, global_state, updates)

        def state_dict(self) -> dict:
            return {"rounds": self.rounds}

        def load_state_dict(self, state: dict) -> None:
            self.rounds = state["rounds"]

    script = _Scripted([0.2, 0.5, 0.5], {(0, 8): 1.0, (1, 8): 2.0})
    kwargs = dict(clients_per_group=1, num_layers=2, start=(0, 8), window_s=2.0, seed=0)
    strategy = TrialGroupStrategy(**kwargs)
    assert isinstance(strategy, FedAvg)
    strategy.use_aggregator(CountingMean())
    server = _server(strategy, script, num_clients=4)
    _run_window(server, script, round0=0)
    assert strategy.aggregator.rounds > 0 and strategy.state_dict()["aggregator"] == {
        "rounds": strategy.aggregator.rounds
    }
    restored = TrialGroupStrategy(**kwargs)
    restored.use_aggregator(CountingMean())
    restored.load_state_dict(strategy.state_dict())
    assert restored.aggregator.rounds == strategy.aggregator.rounds
