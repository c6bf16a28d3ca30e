"""FedARA: the budget schedule, allocation on scripted importance, packed updates, pruning, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FedPEFTModule, RoundSync
from lightning_fedpeft.fedara import (
    IMPORTANCE,
    BudgetSchedule,
    ModulePruning,
    RankAllocation,
    RankAllocationStrategy,
)
from lightning_fedpeft.protocol import ClientUpdate
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import trainable_state
from lightning_fedpeft.tuners.svd import module_names_in_state, pack, svd_layers, triplet_keys, unpack


def _svd_module(rank: int = 4, seed: int = 0) -> FedPEFTModule:
    torch.manual_seed(seed)
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="svd", rank=rank)
    with torch.no_grad():  # stand-in for training: Λ starts at zero, which would make every triplet a no-op
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (4, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}


def _toy_state(modules: int = 3, rank: int = 4) -> dict[str, torch.Tensor]:
    state = {}
    for m in range(modules):
        e, a, b = triplet_keys(f"model.layer.{m}.query")
        state[e] = torch.arange(rank, dtype=torch.float32).reshape(rank, 1) + 10 * m
        state[a] = torch.randn(rank, 5)
        state[b] = torch.randn(6, rank)
    state["model.classifier.weight"] = torch.randn(3, 6)
    return state


# -- the schedule ---------------------------------------------------------------------------------------------
def test_budget_schedule_is_flat_then_cubic_then_frozen_at_the_target() -> None:
    s = BudgetSchedule(init_budget=120, target_budget=24, total_rounds=20, warmup_rounds=3, final_rounds=4)
    budgets = [s.budget(t) for t in range(0, 25)]
    assert budgets[:4] == [120] * 4  # warm-up: full budget
    assert all(b == 24 for b in budgets[16:])  # from the last mask round (20 - 4) on: the target
    assert all(x >= y for x, y in zip(budgets, budgets[1:], strict=False))  # never rises
    # cubic: 6 of the 13 decay rounds in, (7/13)^3 of the range is left
    assert s.budget(3 + 6) == int(24 + 96 * (7 / 13) ** 3) == 38
    assert budgets[4] > budgets[10] > budgets[12] > 24
    assert [s.phase(t) for t in (3, 4, 16, 17)] == ["warmup", "decay", "decay", "final"]
    assert [t for t in range(1, 21) if s.masks_after(t, every=5)] == [8, 13, 16]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_budget": 10, "target_budget": 20, "total_rounds": 10}, "target_rank"),
        ({"init_budget": 10, "target_budget": 2, "total_rounds": 5, "warmup_rounds": 3, "final_rounds": 2}, "warmup"),
    ],
)
def test_budget_schedule_rejects_impossible_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BudgetSchedule(**kwargs)


# -- allocation on scripted importance -------------------------------------------------------------------------
def test_allocation_masks_exactly_the_lowest_scored_triplets_and_meets_each_budget() -> None:
    state = _toy_state(modules=3, rank=4)
    modules = module_names_in_state(state)
    schedule = BudgetSchedule(init_budget=12, target_budget=3, total_rounds=6, warmup_rounds=1, final_rounds=1)
    strategy = RankAllocationStrategy(2, schedule, importance_beta=0.0, prune_empty=True)
    server = FederatedServer(strategy, num_clients=4)
    server.initialize(state)
    # A scripted importance per (module, triplet), the same every round: a strict order over all 12.
    script = {m: torch.tensor([7.0, 1.0, 11.0, 4.0]) + 20.0 * k for k, m in enumerate(modules)}
    order = sorted((float(script[m][i]), m, i) for m in modules for i in range(4))
    for round_idx in range(6):
        plan = server.open_round(round_idx)
        for cid in plan.client_ids:
            tensors = {}
            for m in modules:  # what a client sends: one value per active triplet (all of them at first)
                mask = strategy.masks.get(m, torch.ones(4, dtype=torch.bool))
                if mask.any():
                    tensors[m + IMPORTANCE] = script[m][mask]
            told = plan.instructions.get(cid, {}).get("importance", False)  # the plan says when to send them
            assert told == (round_idx + 1 <= schedule.last_mask_round)
            state = {k: v.clone() for k, v in server.global_state.items()}
            assert server.submit(ClientUpdate(cid, round_idx, 10, state, tensors=tensors if told else {}))
        server.close_round()
        server.finish_round()
        budget = schedule.budget(round_idx + 1)
        assert strategy.active_ranks == budget, f"round {round_idx}: {strategy.active_ranks} active, budget {budget}"
        masked = {(m, i) for m in modules for i in range(4) if not strategy.masks[m][i]}
        assert masked == {(m, i) for _, m, i in order[: 12 - budget]}, f"round {round_idx}"
    assert strategy.active_ranks == 3
    # The third module keeps its 3 best triplets; the other two lose all theirs and leave the wire.
    assert module_names_in_state(server.global_state) == [modules[2]]
    assert server.global_state[triplet_keys(modules[2])[0]].flatten().tolist() == [20.0, 22.0, 23.0]


def test_an_update_without_importance_is_rejected_while_allocation_needs_it() -> None:
    state = _toy_state(modules=2, rank=2)
    schedule = BudgetSchedule(init_budget=4, target_budget=2, total_rounds=4, warmup_rounds=1)
    strategy = RankAllocationStrategy(1, schedule)
    server = FederatedServer(strategy, num_clients=1)
    server.initialize(state)  # the strategy takes the starting state: every triplet active
    server.open_round(0)
    assert not server.submit(ClientUpdate(0, 0, 5, dict(state)))
    assert "no importance" in server.record.rejected[0]


# -- only active triplets travel, and the server rebuilds the full state -----------------------------------------
def test_packed_state_carries_only_active_triplets_and_unpacks_to_the_full_state() -> None:
    full = _toy_state(modules=2, rank=4)
    m0, m1 = module_names_in_state(full)
    masks = {m0: torch.tensor([True, False, True, False]), m1: torch.zeros(4, dtype=torch.bool)}
    packed = pack(full, masks, drop_empty=True)
    e0, a0, b0 = triplet_keys(m0)
    assert packed[e0].flatten().tolist() == [0.0, 2.0]
    assert packed[a0].shape == (2, 5) and packed[b0].shape == (6, 2)
    assert not any(k.startswith(m1 + ".") for k in packed), "a module with no active triplet leaves the wire"
    assert torch.equal(packed["model.classifier.weight"], full["model.classifier.weight"])
    # The server averages packed updates and scatters them back; masked triplets keep their last values.
    trained = {k: v + 1.0 for k, v in packed.items()}
    rebuilt = unpack(trained, masks, full)
    assert set(rebuilt) == set(full)
    assert torch.equal(rebuilt[a0][[0, 2]], full[a0][[0, 2]] + 1.0)
    assert torch.equal(rebuilt[a0][[1, 3]], full[a0][[1, 3]])
    assert torch.equal(rebuilt[b0][:, [0, 2]], full[b0][:, [0, 2]] + 1.0)
    assert torch.equal(rebuilt[triplet_keys(m1)[1]], full[triplet_keys(m1)[1]])


def test_cutting_a_layer_to_its_active_triplets_keeps_the_function() -> None:
    module = _svd_module(rank=4)
    state = trainable_state(module)
    modules = module_names_in_state(state)
    masks = {m: torch.tensor([True, False, True, True]) for m in modules}
    # peft's way to mask: zero Λ of the masked triplets, keep everything else
    zeroed = {k: v.clone() for k, v in state.items()}
    for m in modules:
        zeroed[triplet_keys(m)[0]][1] = 0.0
    module.set_trainable_state(zeroed)
    with torch.no_grad():
        expected = module(**_batch()).logits
    module.set_trainable_state(pack(state, masks, drop_empty=True))  # physically 3 triplets per layer
    assert {layer.lora_E["default"].shape[0] for layer in svd_layers(module.model).values()} == {3}
    with torch.no_grad():
        torch.testing.assert_close(module(**_batch()).logits, expected)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) < sum(v.numel() for v in state.values())


# -- pruning ------------------------------------------------------------------------------------------------------
def test_a_pruned_module_no_longer_runs_and_the_output_is_unchanged() -> None:
    module = _svd_module(rank=4)
    state = trainable_state(module)
    modules = module_names_in_state(state)
    target = next(m for m in modules if ".layer.1." in m and m.endswith("intermediate.dense"))
    calls: list[int] = []
    module.get_submodule(target).register_forward_hook(lambda *_: calls.append(1))
    masks = {m: torch.ones(4, dtype=torch.bool) for m in modules}
    masks[target] = torch.zeros(4, dtype=torch.bool)
    module.set_trainable_state(pack(state, masks, drop_empty=False))  # fully masked: rank 0, still running
    with torch.no_grad():
        before = module(**_batch()).logits
    assert calls == [1]
    module.set_trainable_state(pack(state, masks, drop_empty=True))  # now pruned
    with torch.no_grad():
        after = module(**_batch()).logits
    assert calls == [1], "the pruned module ran"
    torch.testing.assert_close(after, before)
    assert target not in ["model." + n for n in svd_layers(module.model)]
    assert not any(n.startswith(target + ".") for n, p in module.named_parameters() if p.requires_grad)


def test_backward_stops_below_the_lowest_layer_with_a_live_module() -> None:
    module = _svd_module(rank=2)
    state = trainable_state(module)
    masks = {m: torch.tensor([".layer.1." in m] * 2) for m in module_names_in_state(state)}
    module.set_trainable_state(pack(state, masks, drop_empty=True))  # every module of layer 0 pruned
    needs_grad: dict[int, bool] = {}
    layers = module.model.base_model.model.bert.encoder.layer
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda _m, _i, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad))
    module.train()
    module(**_batch()).loss.backward()
    assert needs_grad == {0: False, 1: True}, "layer 0 has nothing to train: autograd must not record it"


# -- the callbacks in a run, and their state in a checkpoint ------------------------------------------------------
def _build(data, trainer_factory, max_epochs: int, **trainer_kwargs):
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=4, lr=5e-3)
    sync = RoundSync(clients_per_round=2, seed=0, eval_every=10)
    allocation = RankAllocation(target_rank=1.0, total_rounds=6, warmup_rounds=1, final_rounds=1)
    trainer = trainer_factory(
        max_epochs=max_epochs, callbacks=[sync, allocation, ModulePruning()], limit_val_batches=0, **trainer_kwargs
    )
    return model, sync, allocation, trainer


def test_rank_allocation_cuts_the_wire_and_its_state_rides_in_the_checkpoint(
    stackoverflow, trainer_factory, tmp_path: Path
) -> None:
    data = stackoverflow(num_clients=8, max_train_examples=160, max_val_examples=32, max_test_examples=32)
    pl.seed_everything(0)
    model, sync, allocation, trainer = _build(data, trainer_factory, max_epochs=6)
    trainer.fit(model, datamodule=data)
    rows = sync.history
    modules = 12
    assert [r["budget"] for r in rows] == [allocation.strategy.schedule.budget(t) for t in range(1, 7)]
    assert rows[-1]["active_ranks"] == modules * 1
    assert rows[-1]["bytes_down"] < rows[0]["bytes_down"] / 2, "the wire carries only active triplets"
    assert all(r["live_modules"] <= modules for r in rows)
    assert {"step_time_ms", "peak_rss_mb", "saved_activation_mb"} <= set(rows[-1])
    live = allocation.strategy.live_modules
    assert sorted("model." + n for n in svd_layers(model.model)) == sorted(live)

    # The same run, stopped after 3 rounds and resumed from its checkpoint, ends in the same place.
    pl.seed_everything(0)
    model_a, _, alloc_a, trainer_a = _build(data, trainer_factory, max_epochs=3)
    trainer_a.fit(model_a, datamodule=data)
    ckpt = tmp_path / "fedara.ckpt"
    trainer_a.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert any("masks" in s.get("strategy", {}) for s in saved["callbacks"].values())  # RoundSync's state
    pl.seed_everything(0)
    model_b, _, alloc_b, trainer_b = _build(data, trainer_factory, max_epochs=6)
    trainer_b.fit(model_b, datamodule=data, ckpt_path=str(ckpt))
    for m, mask in allocation.strategy.masks.items():
        assert torch.equal(alloc_b.strategy.masks[m], mask), m
    final = trainable_state(model)
    resumed = trainable_state(model_b)
    assert set(final) == set(resumed)
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=1e-4, atol=1e-5)


def test_rank_allocation_and_pruning_explain_bad_setups(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=16, max_test_examples=16)
    adapter = FedPEFTModule(num_labels=20, num_hidden_layers=2, method="adapter", depth=2)
    trainer = trainer_factory(max_epochs=2, callbacks=[RoundSync(clients_per_round=2), RankAllocation()])
    with pytest.raises(ValueError, match="method='svd'"):
        trainer.fit(adapter, datamodule=data)
    svd = FedPEFTModule(num_labels=20, num_hidden_layers=2, method="svd", rank=2)
    trainer = trainer_factory(max_epochs=3, callbacks=[RoundSync(clients_per_round=2), RankAllocation()])
    with pytest.raises(ValueError, match="warmup_rounds=2"):  # 2 + 2 rounds leave none in 3
        trainer.fit(svd, datamodule=data)
    trainer = trainer_factory(max_epochs=3, callbacks=[RoundSync(clients_per_round=2), ModulePruning()])
    with pytest.raises(ValueError, match="RankAllocation"):
        trainer.fit(svd, datamodule=data)


def test_the_batched_penalty_and_foreach_averages_give_pefts_numbers() -> None:
    from peft.tuners.adalora.layer import RankAllocator

    from lightning_fedpeft.fedara.client import SensitivityAverages
    from lightning_fedpeft.tuners.svd import set_rank

    module = _svd_module(rank=4)  # eval mode: no dropout, so two forwards of one batch agree
    module.activation_cache = None  # the plain path, which takes the batched penalty
    layers = svd_layers(module.model)
    set_rank(layers[next(iter(layers))], 2)  # ranks that differ between modules, as after an allocation
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    peft_loss = module.model(**_batch()).loss  # peft's forward: its per-factor penalty inside
    ours = module.training_step(_batch(), 0)
    torch.testing.assert_close(ours, peft_loss, rtol=1e-6, atol=0)
    assert float(ours - module.model.get_base_model()(**_batch()).loss) > 0.01  # the penalty is in it

    config = module.model.peft_config["default"]
    theirs = RankAllocator(module.model, type(config)(**{**config.to_dict(), "beta1": 0.85, "beta2": 0.7}), "default")
    mine = SensitivityAverages(0.85, 0.7)
    for step in range(3):
        module.zero_grad()
        module.training_step(_batch(), step).backward()
        theirs.update_ipt(module.model)
        mine.update_ipt(module.model)
    assert set(mine.exp_avg_ipt) == set(theirs.exp_avg_ipt)
    for name in theirs.exp_avg_ipt:
        assert torch.equal(mine.exp_avg_ipt[name], theirs.exp_avg_ipt[name]), name
        assert torch.equal(mine.exp_avg_unc[name], theirs.exp_avg_unc[name]), name
    assert any(bool(t.abs().sum() > 0) for t in mine.exp_avg_unc.values())
