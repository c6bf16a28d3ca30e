"""A mixed fleet: dealing devices, memory, per-coordinate aggregation and heterogeneous LoRA, by hand."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FedPEFTModule, HeterogeneousLoRA, RoundSync, SetupError
from lightning_fedpeft.aggregation import CoordinateMedian, DPGaussian, NormBounded, TrimmedMean, WeightedMean
from lightning_fedpeft.cost import CostModel, load_device_profiles, train_memory_bytes
from lightning_fedpeft.fedadapter import ProgressiveUpgrade
from lightning_fedpeft.fedadapter.strategy import DepthCosts, TrialGroupStrategy
from lightning_fedpeft.fedara import IMPORTANCE, BudgetSchedule, ModulePruning, RankAllocation, RankAllocationStrategy
from lightning_fedpeft.fedara.strategy import PrefixCosts
from lightning_fedpeft.fleet import Fleet
from lightning_fedpeft.hetlora import HeteroLoRAStrategy, RankCut, rank_masks
from lightning_fedpeft.protocol import ClientUpdate
from lightning_fedpeft.resources import ClientResources
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import trainable_state
from lightning_fedpeft.strategy import FedAvg
from lightning_fedpeft.tuners.svd import TripletCut, svd_layers, triplet_keys

# -- the fleet ----------------------------------------------------------------------------------------------------


def test_fractions_are_dealt_by_largest_remainder_from_the_seed_alone() -> None:
    fleet = Fleet(fractions={"rpi4b": 0.5, "orin_nano": 0.3, "tx2": 0.2})
    known = list(load_device_profiles())
    devices = fleet.deal(7, seed=3, known=known)
    # 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the one left goes to the largest remainder (rpi4b's 0.5)
    assert sorted(devices) == sorted(["rpi4b"] * 4 + ["orin_nano"] * 2 + ["tx2"])
    assert fleet.deal(7, seed=3, known=known) == devices, "the same seed deals the same fleet"
    assert any(fleet.deal(7, seed=s, known=known) != devices for s in range(4, 10)), "the seed decides who gets what"


def test_a_mapping_file_gives_each_client_its_device(tmp_path: Path) -> None:
    known = list(load_device_profiles())
    yaml_file = tmp_path / "fleet.yaml"
    yaml_file.write_text("0: tx2\n1: rpi4b\n2: tx2\n")
    assert Fleet(mapping_file=str(yaml_file)).deal(3, seed=0, known=known) == ["tx2", "rpi4b", "tx2"]
    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text("client,device\n1,nano\n0,orin_nano\n")
    assert Fleet(mapping_file=str(csv_file)).deal(2, seed=0, known=known) == ["orin_nano", "nano"]
    with pytest.raises(ValueError, match=r"mapping_file.*missing \[3\]"):
        Fleet(mapping_file=str(yaml_file)).deal(4, seed=0, known=known)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"fractions": {"rpi4b": 0.5, "tx2": 0.4}}, r"fractions sum to 0.9, not 1"),
        ({"fractions": {"rpi4b": 0.5, "tx2": 0.5}, "mapping_file": "x.yaml"}, "exactly one of"),
        ({}, "exactly one of"),
        ({"fractions": {"rpi4b": 1.5}}, r"fractions\['rpi4b'\]=1.5"),
        ({"fractions": {"tx2": 1.0}, "round_budget_s": -1.0}, "round_budget_s=-1.0"),
    ],
)
def test_bad_fleet_settings_are_refused_naming_the_setting(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Fleet(**settings)


def test_an_unknown_profile_is_refused_when_the_cost_model_deals_the_fleet() -> None:
    cost = CostModel(fleet=Fleet(fractions={"rpi5": 0.5, "tx2": 0.5}))
    with pytest.raises(ValueError, match=r"unknown device profile\(s\) \['rpi5'\]"):
        cost.bind(4, seed=0)


def test_each_client_is_timed_on_its_own_device() -> None:
    cost = CostModel(fleet=Fleet(fractions={"rpi4b": 0.5, "tx2": 0.5}))
    cost.bind(4, seed=0)
    model = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="lora", rank=2).model
    ids = torch.randint(1000, 5000, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    seconds = {cost.client_devices[c]: cost.batch_seconds(model, batch, client_id=c) for c in range(4)}
    # rpi4b is 20x the TX2's time per batch (the published ratio; overhead scaled alike)
    assert seconds["rpi4b"] == pytest.approx(20 * seconds["tx2"])


def test_counted_memory_is_within_what_the_process_measures(stackoverflow, trainer_factory) -> None:
    # The count (weights, 3x the trainable part, saved activations) cannot exceed what the process really
    # holds while training (its peak RSS also has Python, torch and the data); and its activation part
    # grows with the batch as autograd's saved storages do.
    data = stackoverflow(num_clients=2, max_train_examples=16, max_val_examples=8, max_test_examples=8)
    model = FedPEFTModule(num_labels=20, num_hidden_layers=2, method="lora", rank=4)
    resources = ClientResources()
    trainer = trainer_factory(
        max_epochs=1, callbacks=[RoundSync(clients_per_round=1, num_clients=2), resources], limit_val_batches=0
    )
    trainer.fit(model, datamodule=data)
    row = RoundSync.find(trainer).history[-1]
    batch = next(iter(data.train_dataloader()))
    counted = train_memory_bytes(model.model, batch)
    assert counted / 2**20 < row["peak_rss_mb"]
    params = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert counted > params
    small = {k: v[:1] for k, v in batch.items()}
    assert train_memory_bytes(model.model, small) < counted


def test_counting_memory_leaves_no_activation_alive() -> None:
    # The count records saved storages with saved_tensors_hooks. A pack hook that returned the tensor left the
    # forward's graph and activations alive after the call (held from autograd's C++ side, out of gc's reach),
    # so every count leaked them: FedARA on a fleet counts every candidate prefix every round, and the 40-round
    # fleet bench ran out of 24 GB.
    import gc

    model = FedPEFTModule(num_labels=20, num_hidden_layers=2, method="svd", rank=4).model
    batch = {"input_ids": torch.randint(5, 100, (4, 16)), "labels": torch.zeros(4, dtype=torch.long)}

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    first = train_memory_bytes(model, batch)
    before = live_tensors()
    assert [train_memory_bytes(model, batch) for _ in range(3)] == [first] * 3
    assert live_tensors() == before, "a counted forward's tensors outlived it"


# -- per-coordinate aggregation, against references computed by hand ---------------------------------------------


def _three() -> tuple[dict, list[ClientUpdate], list[dict]]:
    glob = {"w": torch.zeros(4)}
    values = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]]
    updates = [
        ClientUpdate(i, 0, n, {"w": torch.tensor(v)}) for i, (v, n) in enumerate(zip(values, [1, 2, 3], strict=True))
    ]
    held = [  # client 0 holds the first three coordinates, client 1 the first two, client 2 the first; none the last
        {"w": torch.tensor([True, True, True, False])},
        {"w": torch.tensor([True, True, False, False])},
        {"w": torch.tensor([True, False, False, False])},
    ]
    return glob, updates, held


def test_every_rule_works_per_coordinate_over_the_clients_that_hold_it() -> None:
    glob, updates, held = _three()
    # coordinate 0: all three (weights 1, 2, 3); 1: clients 0, 1; 2: client 0; 3: nobody (keeps 0)
    mean = WeightedMean().combine(0, glob, updates, held)["w"]
    expected = [(1 * 1 + 5 * 2 + 9 * 3) / 6, (2 * 1 + 6 * 2) / 3, 3.0, 0.0]
    torch.testing.assert_close(mean, torch.tensor(expected))
    median = CoordinateMedian().combine(0, glob, updates, held)["w"]
    torch.testing.assert_close(median, torch.tensor([5.0, (2.0 + 6.0) / 2, 3.0, 0.0]))
    trimmed = TrimmedMean(trim=1)
    trimmed.bind(3, 3, 0)
    # three holders: drop 1 and 9 -> 5; two holders keep both; one keeps one
    torch.testing.assert_close(trimmed.combine(0, glob, updates, held)["w"], torch.tensor([5.0, 4.0, 3.0, 0.0]))
    bounded = NormBounded(max_norm=1e6).combine(0, glob, updates, held)["w"]
    torch.testing.assert_close(bounded, mean)
    # every client held whole: the per-coordinate path gives the plain rule's numbers
    whole = [{"w": torch.ones(4, dtype=torch.bool)}] * 3
    torch.testing.assert_close(
        WeightedMean().combine(0, glob, updates, whole)["w"], WeightedMean().combine(0, glob, updates)["w"]
    )


def test_dp_noise_is_the_sums_noise_over_each_coordinates_holders() -> None:
    glob, updates, held = _three()
    dp = DPGaussian(clip_norm=100.0, noise_multiplier=0.5)
    dp.bind(3, 30, seed=0)
    out = dp.combine(4, glob, updates, held)["w"]
    plain = DPGaussian(clip_norm=100.0, noise_multiplier=0.5)
    plain.bind(3, 30, seed=0)
    # The same round draws the same noise: recover it from the plain rule (sum / 3 + noise * 100 * 0.5 / 3).
    noise = (plain.combine(4, glob, updates)["w"] - torch.tensor([15.0, 18.0, 21.0, 24.0]) / 3) * 3 / 50.0
    sums, counts = torch.tensor([15.0, 8.0, 3.0, 0.0]), torch.tensor([3.0, 2.0, 1.0, 0.0])
    expected = torch.where(counts > 0, (sums + noise * 50.0) / counts.clamp_min(1), 0.0)
    torch.testing.assert_close(out, expected)


# -- heterogeneous LoRA ---------------------------------------------------------------------------------------------


def _lora_state(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"m.q.lora_A.default.weight": a, "m.q.lora_B.default.weight": b, "m.head.weight": torch.zeros(2)}


def test_both_hetlora_rules_against_a_dense_reference_by_hand() -> None:
    r, d_in, d_out = 3, 2, 2
    glob = _lora_state(torch.full((r, d_in), 7.0), torch.full((d_out, r), 7.0))
    ranks, examples = [1, 2, 3], [1, 1, 2]
    updates = []
    for cid, rank in enumerate(ranks):
        a, b = glob["m.q.lora_A.default.weight"].clone(), glob["m.q.lora_B.default.weight"].clone()
        a[:rank] = float(cid + 1)  # what client cid trained: its first `rank` ranks
        b[:, :rank] = -float(cid + 1)
        head = torch.full((2,), float(cid))
        state = {"m.q.lora_A.default.weight": a, "m.q.lora_B.default.weight": b, "m.head.weight": head}
        updates.append(ClientUpdate(cid, 0, examples[cid], state))
    # Rank i's row of A by hand: per coordinate over the clients whose rank exceeds i (weights 1, 1, 2).
    per_rank_holders = [[0, 1, 2], [1, 2], [2]]
    exact_a = [sum((c + 1) * examples[c] for c in h) / sum(examples[c] for c in h) for h in per_rank_holders]
    # Zero-padding: every client counts, with zeros beyond its rank (total weight 4).
    padded_a = [sum((c + 1) * examples[c] for c in h) / 4 for h in per_rank_holders]
    head = sum(c * examples[c] for c in range(3)) / 4
    for rule, rows in (("per_coordinate", exact_a), ("zero_pad", padded_a)):
        strategy = HeteroLoRAStrategy(3, ranks, rule=rule)
        strategy.validate(3)
        strategy.initialize(glob)
        out = strategy.aggregate(0, glob, updates)
        expected_a = torch.tensor(rows).reshape(r, 1).expand(r, d_in)
        torch.testing.assert_close(out["m.q.lora_A.default.weight"], expected_a, msg=rule)
        torch.testing.assert_close(out["m.q.lora_B.default.weight"], -expected_a.T.expand(d_out, r), msg=rule)
        torch.testing.assert_close(out["m.head.weight"], torch.full((2,), head), msg=rule)
    # The per-coordinate rule does not shrink rank 2 (held by one client) towards zero; zero-padding does.
    assert exact_a[2] == 3.0 and padded_a[2] == 1.5


def test_an_update_that_changed_ranks_beyond_its_own_is_rejected() -> None:
    glob = _lora_state(torch.zeros(3, 2), torch.zeros(2, 3))
    strategy = HeteroLoRAStrategy(1, [1], rule="per_coordinate")
    strategy.initialize(glob)
    honest = dict(glob) | {"m.q.lora_A.default.weight": torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])}
    assert strategy.check_update(ClientUpdate(0, 0, 1, honest)) is None
    greedy = dict(glob) | {"m.q.lora_A.default.weight": torch.ones(3, 2)}
    assert "beyond the first 1 ranks" in strategy.check_update(ClientUpdate(0, 0, 1, greedy))
    assert rank_masks(glob, 2)["m.q.lora_B.default.weight"].tolist() == [[True, True, False]]


def test_an_aggregator_without_held_masks_is_refused_at_setup_where_clients_train_parts() -> None:
    """A user's aggregator written before held masks: refused by validate (before any round) where the strategy
    combines clients that trained parts of the state, accepted where it never does."""

    class OldMean(WeightedMean):
        def combine(self, round_idx, global_state, updates):  # noqa: ANN001, ANN201
            return super().combine(round_idx, global_state, updates)

    schedule = BudgetSchedule(init_budget=6, target_budget=6, total_rounds=10)
    devices = ["rpi4b", "tx2"] * 4
    parts = {
        "nested prefixes": RankAllocationStrategy(2, schedule, client_devices=devices),
        "per-coordinate ranks": HeteroLoRAStrategy(2, [2, 8] * 4, rule="per_coordinate"),
        "per-client depths": TrialGroupStrategy(2, 3, (3, 8), window_s=1.0, client_devices=devices),
    }
    wholes = {
        "one configuration": RankAllocationStrategy(2, schedule),
        "zero-padding": HeteroLoRAStrategy(2, [2, 8] * 4, rule="zero_pad"),
        "fleet, no per-client depth": TrialGroupStrategy(
            2, 3, (3, 8), window_s=1.0, client_devices=devices, per_client_depth=False
        ),
    }
    for what, strategy in parts.items():
        strategy.use_aggregator(OldMean())
        with pytest.raises(ValueError, match="federation.aggregator=OldMean .*held=None"):
            strategy.validate(len(devices))
        strategy.use_aggregator(WeightedMean())
        strategy.validate(len(devices))  # the packaged aggregators take held masks
        assert strategy.combines_parts(), what
    for what, strategy in wholes.items():
        strategy.use_aggregator(OldMean())
        strategy.validate(len(devices))
        assert not strategy.combines_parts(), what


def test_a_rank_cut_is_the_global_model_without_its_last_ranks() -> None:
    torch.manual_seed(0)
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="lora", rank=4).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = trainable_state(module)
    ids = torch.randint(1000, 5000, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # By hand: rank 2 = the last two ranks' B columns zeroed in the full model.
    zeroed = {
        k: (v.clone().index_fill_(1, torch.tensor([2, 3]), 0.0) if "lora_B" in k else v) for k, v in before.items()
    }
    module.set_trainable_state(zeroed)
    reference = module.model(**batch).logits
    module.set_trainable_state(before)
    cut = RankCut(module.model, 2)
    assert all(tuple(p.shape)[0] == 2 for n, p in module.named_parameters() if "lora_A" in n)
    torch.testing.assert_close(module.model(**batch).logits, reference)
    with torch.no_grad():  # "training" the cut ranks
        for name, p in module.named_parameters():
            if "lora_A" in name:
                p.add_(1.0)
    cut.restore()
    after = trainable_state(module)
    for k, v in before.items():
        if "lora_A" in k:
            torch.testing.assert_close(after[k][:2], v[:2] + 1.0)
            torch.testing.assert_close(after[k][2:], v[2:])
        else:
            torch.testing.assert_close(after[k], v)


# -- heterogeneous LoRA in a run ------------------------------------------------------------------------------------


def _hetlora_run(data, trainer_factory, hetero: HeterogeneousLoRA, cost: CostModel, epochs: int = 2, **kw):
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="lora", rank=4, lr=5e-3)
    sync = RoundSync(clients_per_round=3, seed=0, eval_every=10, cost_model=cost, **kw)
    trainer = trainer_factory(max_epochs=epochs, callbacks=[sync, hetero], limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    return model, sync


def test_a_fleet_trains_each_device_at_its_rank(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=6, max_train_examples=96, max_val_examples=16, max_test_examples=16)
    cost = CostModel(fleet=Fleet(fractions={"rpi4b": 0.5, "tx2": 0.5}))
    hetero = HeterogeneousLoRA(ranks={"rpi4b": 1, "tx2": 4})
    model, sync = _hetlora_run(data, trainer_factory, hetero, cost)
    rows = sync.history
    assert len(rows) == 2 and all(1 <= r["mean_client_rank"] <= 4 for r in rows)
    assert all(p.shape[0] == 4 for n, p in model.named_parameters() if "lora_A" in n), "the global state is full rank"
    devices = cost.client_devices
    assert sorted(devices) == ["rpi4b"] * 3 + ["tx2"] * 3


@pytest.mark.parametrize(
    ("hetero", "fleet", "match"),
    [
        ({"ranks": {"rpi4b": 1}}, {"fractions": {"rpi4b": 0.5, "tx2": 0.5}}, r"no rank to the fleet's device profile"),
        (
            {"ranks": {"rpi4b": 1, "tx2": 9}},
            {"fractions": {"rpi4b": 0.5, "tx2": 0.5}},
            r"exceed the model's LoRA rank 4",
        ),
        ({"ranks": {"tx2": 1}}, None, "needs a fleet"),
    ],
)
def test_bad_hetero_lora_setups_are_refused_before_training(stackoverflow, trainer_factory, hetero, fleet, match):
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=8, max_test_examples=8)
    cost = CostModel(fleet=Fleet(**fleet) if fleet else None)
    with pytest.raises(SetupError, match=match):
        _hetlora_run(data, trainer_factory, HeterogeneousLoRA(**hetero), cost)


def test_a_device_too_small_for_its_smallest_configuration_is_refused(stackoverflow, trainer_factory, tmp_path):
    profiles = tmp_path / "devices.yaml"
    profiles.write_text("big: {flops_per_s: 1.0e11, memory_gb: 8}\ntiny: {like: big, slowdown: 4, memory_gb: 0.01}\n")
    data = stackoverflow(num_clients=4, max_train_examples=40, max_val_examples=8, max_test_examples=8)
    cost = CostModel(device="big", devices_file=str(profiles), fleet=Fleet(fractions={"big": 0.5, "tiny": 0.5}))
    with pytest.raises(SetupError, match=r"profile 'tiny' \(memory_gb=0.01\) cannot hold LoRA rank 1"):
        _hetlora_run(data, trainer_factory, HeterogeneousLoRA(ranks={"big": 4, "tiny": 1}), cost)
    # Without per-client configurations, the global one is checked the same way.
    cost = CostModel(device="big", devices_file=str(profiles), fleet=Fleet(fractions={"big": 0.5, "tiny": 0.5}))
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="lora", rank=4)
    trainer = trainer_factory(max_epochs=1, callbacks=[RoundSync(clients_per_round=2, cost_model=cost)])
    with pytest.raises(SetupError, match=r"profile 'tiny' .* cannot hold the global configuration"):
        trainer.fit(model, datamodule=data)


# -- FedARA on a fleet: nested prefixes of the importance order ------------------------------------------------------


def _toy_svd_state(modules: int = 2, rank: int = 3) -> dict[str, torch.Tensor]:
    state = {}
    for m in range(modules):
        e, a, b = triplet_keys(f"model.layer.{m}.query")
        state[e] = torch.zeros(rank, 1)
        state[a] = torch.zeros(rank, 2)
        state[b] = torch.zeros(2, rank)
    state["model.classifier.weight"] = torch.zeros(2)
    return state


def _fleet_strategy(devices: list[str], **kw) -> RankAllocationStrategy:
    schedule = BudgetSchedule(init_budget=6, target_budget=6, total_rounds=10)
    return RankAllocationStrategy(len(devices), schedule, seed=0, client_devices=devices, **kw)


def test_prefixes_follow_the_importance_order_and_are_nested() -> None:
    strategy = _fleet_strategy(["tx2", "rpi4b"])
    strategy.start(_toy_svd_state())
    m0, m1 = "model.layer.0.query", "model.layer.1.query"
    strategy.scores[m0] = torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64)
    strategy.scores[m1] = torch.tensor([0.3, 0.7, 0.2], dtype=torch.float64)
    assert strategy.importance_order() == [(m0, 0), (m1, 1), (m0, 2), (m1, 0), (m1, 2), (m0, 1)]
    sizes, prefixes = strategy.candidate_prefixes()
    assert sizes == [6, 4, 3, 2, 1]  # shares 1, 3/4, 1/2, 3/8 and 1/4 of 6 (rounded), 1/8 and 1/16 -> 1
    for big, small in zip(prefixes, prefixes[1:], strict=False):
        assert all(set(small.get(m, [])) <= set(ix) for m, ix in big.items()), "every prefix holds the smaller ones"
    assert prefixes[-1] == {m0: [0]} and prefixes[-2] == {m0: [0], m1: [1]}


def test_each_triplet_is_averaged_over_the_clients_that_trained_it() -> None:
    # A set round budget (1 s): the median participant here would be an rpi4b, which would fit everything.
    strategy = _fleet_strategy(["tx2", "rpi4b", "rpi4b"], device_memory_gb={"tx2": 8.0}, round_budget_s=1.0)
    state = _toy_svd_state()
    strategy.start(state)
    m0, m1 = "model.layer.0.query", "model.layer.1.query"
    strategy.scores[m0] = torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64)
    strategy.scores[m1] = torch.tensor([0.3, 0.7, 0.2], dtype=torch.float64)
    (query,) = strategy.queries()
    assert isinstance(query, PrefixCosts) and len(query.prefixes) == 5
    # Scripted costs: the tx2 fits everything within 1 s; the rpi4b only the two smallest prefixes.
    costs = [{"seconds": {"tx2": 1.0, "rpi4b": 10.0 - i}, "memory_bytes": 0} for i in range(5)]
    costs[-2]["seconds"]["rpi4b"] = costs[-1]["seconds"]["rpi4b"] = 0.5
    strategy.answer(query, costs)
    plan = strategy.configure_round(0, 3)
    told = {cid: plan.instructions[cid]["triplets"] for cid in plan.client_ids}
    assert told[0] == {m0: [0, 1, 2], m1: [0, 1, 2]} and told[1] == told[2] == {m0: [0], m1: [1]}
    # Every client moves what it trained to (client + 1), with 1, 2 and 3 examples; importance alike.
    updates = []
    for cid, examples in ((0, 1), (1, 2), (2, 3)):
        new, tensors = {k: v.clone() for k, v in state.items()}, {}
        for m in (m0, m1):
            e, a, b = triplet_keys(m)
            ix = told[cid].get(m, [])
            new[e][ix], new[a][ix], new[b][:, ix] = cid + 1.0, cid + 1.0, cid + 1.0
            imp = torch.zeros(3)
            imp[ix] = 10.0 * (cid + 1)
            tensors[m + IMPORTANCE] = imp
        new["model.classifier.weight"] += cid + 1.0
        update = ClientUpdate(cid, 0, examples, new, tensors=tensors)
        assert strategy.check_update(update) is None
        updates.append(update)
    out = strategy.aggregate(0, state, updates)
    e0, e1 = triplet_keys(m0)[0], triplet_keys(m1)[0]
    # By hand: m0's triplet 0 and m1's triplet 1 were trained by all three (weights 1, 2, 3), the others by client 0.
    both = (1 * 1 + 2 * 2 + 3 * 3) / 6
    torch.testing.assert_close(out[e0].flatten(), torch.tensor([both, 1.0, 1.0]))
    torch.testing.assert_close(out[e1].flatten(), torch.tensor([1.0, both, 1.0]))
    torch.testing.assert_close(out["model.classifier.weight"], torch.full((2,), both))
    # Importance likewise: (beta 0.5) half the old score plus half the holders' mean.
    torch.testing.assert_close(strategy.scores[m0][1], torch.tensor(0.5 * 0.1 + 0.5 * 10.0, dtype=torch.float64))
    torch.testing.assert_close(strategy.scores[m0][0], torch.tensor(0.5 * 0.9 + 0.5 * 10.0 * both, dtype=torch.float64))
    assert strategy.transfer_share(1) < strategy.transfer_share(0) == 1.0
    assert strategy.tables()["client_configs"][1] == {"round": 0, "client": 1, "device": "rpi4b", "triplets": 2}
    # The order moved: the next round's prefixes are asked again. A client that changes a triplet it was
    # not given is refused.
    (query,) = strategy.queries()
    strategy.answer(query, costs)
    strategy.configure_round(1, 3)
    sneaky = ClientUpdate(1, 1, 2, {k: v + 1.0 for k, v in strategy.global_state().items()})
    assert "outside the triplets" in strategy.check_update(sneaky)


def test_a_triplet_cut_is_the_model_without_the_other_triplets() -> None:
    torch.manual_seed(0)
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="svd", rank=4).eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    before = trainable_state(module)
    layers = svd_layers(module)
    names = list(layers)
    keep = {names[0]: [1, 3], names[-1]: [0]}  # every other module keeps nothing
    ids = torch.randint(1000, 5000, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    zeroed = {k: v.clone() for k, v in before.items()}
    for name in names:  # by hand: Λ of every triplet not kept set to zero
        e = triplet_keys(name)[0]
        dropped = [i for i in range(4) if i not in keep.get(name, [])]
        zeroed[e][dropped] = 0.0
    module.set_trainable_state(zeroed)
    reference = module.model(**batch).logits
    module.set_trainable_state(before)
    cut = TripletCut(module, keep)
    torch.testing.assert_close(module.model(**batch).logits, reference)
    assert layers[names[1]].lora_A["default"].shape[0] == 0 and not layers[names[1]].lora_A["default"].requires_grad
    with torch.no_grad():
        layers[names[0]].lora_E["default"].add_(1.0)
    cut.restore()
    after = trainable_state(module)
    e0 = triplet_keys(names[0])[0]
    torch.testing.assert_close(after[e0][[1, 3]], before[e0][[1, 3]] + 1.0)
    torch.testing.assert_close(after[e0][[0, 2]], before[e0][[0, 2]])
    assert all(p.requires_grad for n, p in module.named_parameters() if "lora_" in n)
    assert set(after) == set(before)


def _fedara_fleet_run(data, trainer_factory, epochs: int, budgets: bool = True, ckpt: str | None = None, **kw):
    pl.seed_everything(0)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="svd", rank=4, lr=5e-3)
    cost = CostModel(fleet=Fleet(fractions={"rpi4b": 0.5, "tx2": 0.5}))
    sync = RoundSync(clients_per_round=4, seed=0, eval_every=10, cost_model=cost)
    allocation = RankAllocation(target_rank=1.0, total_rounds=5, warmup_rounds=1, final_rounds=1, fleet_budgets=budgets)
    trainer = trainer_factory(
        max_epochs=epochs, callbacks=[sync, allocation, ModulePruning()], limit_val_batches=0, **kw
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return model, sync, allocation, trainer


def test_fedara_on_a_fleet_sizes_each_client_and_resumes_bit_identically(stackoverflow, trainer_factory, tmp_path):
    data = stackoverflow(num_clients=8, max_train_examples=160, max_val_examples=16, max_test_examples=16)
    model, sync, allocation, _ = _fedara_fleet_run(data, trainer_factory, epochs=4)
    rows = sync.history
    assert all(r["min_client_triplets"] < r["active_ranks"] for r in rows), "the rpi4b clients train a prefix"
    assert all(r["pred_saved_s"] >= 0 and r["pred_round_s"] <= r["pred_uniform_round_s"] for r in rows)
    table = allocation.strategy.tables()["client_configs"]
    assert len(table) == 4 * 4 and {row["device"] for row in table} == {"rpi4b", "tx2"}
    slow = [row["triplets"] for row in table if row["device"] == "rpi4b"]
    fast = [row["triplets"] for row in table if row["device"] == "tx2"]
    assert max(slow) < max(fast)
    # The same run's first 2 rounds with every client on the global configuration: slower on the simulated clock.
    _, uniform, _, _ = _fedara_fleet_run(data, trainer_factory, epochs=2, budgets=False)
    assert rows[1]["sim_time_h"] < uniform.history[-1]["sim_time_h"]
    # Stopped after 2 rounds and resumed: the same model, bit for bit, and the same configurations.
    _, _, _, trainer_a = _fedara_fleet_run(data, trainer_factory, epochs=2)
    ckpt = tmp_path / "fleet.ckpt"
    trainer_a.save_checkpoint(ckpt)
    model_b, sync_b, alloc_b, _ = _fedara_fleet_run(data, trainer_factory, epochs=4, ckpt=str(ckpt))
    assert alloc_b.strategy.tables()["client_configs"] == table
    final, resumed = trainable_state(model), trainable_state(model_b)
    assert set(final) == set(resumed)
    for k in final:
        assert torch.equal(final[k], resumed[k]), k
    # (The simulated clock after the resume may differ: the activation cache is not checkpointed, and its
    # refills count as device time.)
    assert [r["mean_client_triplets"] for r in sync_b.history] == [r["mean_client_triplets"] for r in rows]


# -- adapters on a fleet: trial groups within device classes, per-client depth -------------------------------------


def _adapter_state(layers: int = 3) -> dict[str, torch.Tensor]:
    state = {f"model.encoder.layer.{i}.output.adapter.down.weight": torch.zeros(2, 2) for i in range(layers)}
    return state | {"model.classifier.weight": torch.zeros(2)}


def _answer_all(strategy: TrialGroupStrategy, costs: dict[str, list[float]]) -> None:
    """Answer the window's questions: every start accuracy 0.5; per depth d..1 the given seconds per device."""
    while queries := strategy.queries():
        for query in queries:
            if isinstance(query, DepthCosts):
                depths = range(query.config[0], 0, -1)
                value = [
                    {"depth": d, "seconds": {dev: s[i] for dev, s in costs.items()}, "memory_bytes": 0}
                    for i, d in enumerate(depths)
                ]
            else:
                value = 0.5
            strategy.answer(query, value)


def test_trial_groups_are_drawn_within_device_classes() -> None:
    devices = ["rpi4b"] * 12 + ["tx2"] * 6 + ["nano"] * 6  # shares 1/2, 1/4, 1/4: of 4 per group, 2, 1 and 1
    strategy = TrialGroupStrategy(4, num_layers=3, start=(3, 8), window_s=10.0, seed=0, client_devices=devices)
    strategy.validate(len(devices))
    strategy.initialize(_adapter_state())
    _answer_all(strategy, {"rpi4b": [9.0, 9.0, 9.0], "tx2": [1.0, 1.0, 1.0], "nano": [2.0, 2.0, 2.0]})
    assert strategy.group_mix() == {"rpi4b": 2, "tx2": 1, "nano": 1}
    for trial in range(len(strategy.trials)):
        strategy.phase = trial
        plan = strategy.configure_round(trial, len(devices))
        mix = sorted(devices[c] for c in plan.client_ids)
        assert mix == ["nano", "rpi4b", "rpi4b", "tx2"], "every group has the fleet's mix"
    with pytest.raises(ValueError, match=r"need 3 x 1 'tx2' clients per round but the fleet has 2"):
        TrialGroupStrategy(4, 3, (3, 8), window_s=1.0, client_devices=["rpi4b"] * 12 + ["tx2"] * 2).validate(14)


def test_each_adapter_is_averaged_over_the_clients_that_trained_it() -> None:
    devices = ["rpi4b", "tx2"] * 3
    strategy = TrialGroupStrategy(2, num_layers=3, start=(3, 8), window_s=10.0, seed=0, client_devices=devices)
    strategy.validate(6)
    state = _adapter_state()
    strategy.initialize(state)
    # The tx2 fits depth 3 within the median (5 s); the rpi4b only depth 1.
    _answer_all(strategy, {"rpi4b": [9.0, 6.0, 4.0], "tx2": [1.0, 1.0, 1.0]})
    plan = strategy.configure_round(0, 6)
    depth = {c: plan.instructions[c]["train_depth"] for c in plan.client_ids}
    assert sorted((devices[c], d) for c, d in depth.items()) == [("rpi4b", 1), ("tx2", 3)]
    updates = []
    for c in plan.client_ids:
        new = {k: v.clone() for k, v in state.items()}
        for layer in range(3 - depth[c], 3):  # a client changes only its top adapters
            new[f"model.encoder.layer.{layer}.output.adapter.down.weight"] += 1.0 + c
        new["model.classifier.weight"] += 1.0 + c
        update = ClientUpdate(c, 0, 1 + c, new)
        assert strategy.check_update(update) is None
        updates.append(update)
    out = strategy.aggregate(0, state, updates)
    (slow,) = [c for c in depth if depth[c] == 1]
    (fast,) = [c for c in depth if depth[c] == 3]
    both = ((1 + slow) ** 2 + (1 + fast) ** 2) / ((1 + slow) + (1 + fast))  # weights 1 + c, values 1 + c
    torch.testing.assert_close(out["model.encoder.layer.2.output.adapter.down.weight"], torch.full((2, 2), both))
    for layer in (0, 1):  # only the fast client trained these: its value, not pulled towards the global one
        torch.testing.assert_close(
            out[f"model.encoder.layer.{layer}.output.adapter.down.weight"], torch.full((2, 2), 1.0 + fast)
        )
    torch.testing.assert_close(out["model.classifier.weight"], torch.full((2,), both))
    # The slow client ran every adapter of the trial forward (those below its depth frozen, and trained by the
    # fast client last round): it needs the whole state down, and sends back only its top.
    assert strategy.download_share(slow) == 1.0 > strategy.transfer_share(slow)
    assert strategy.download_share(fast) == strategy.transfer_share(fast) == 1.0
    cheat = {k: v + 1.0 for k, v in state.items()}
    strategy.phase, strategy.trials[0].done = 0, 0
    strategy.configure_round(1, 6)
    slow_now = next(c for c, d in strategy._train_depth.items() if d == 1)  # noqa: SLF001
    assert "below the top 1 adapters" in strategy.check_update(ClientUpdate(slow_now, 1, 1, cheat))


@pytest.mark.parametrize("runs_what_it_trains", [True, False])
def test_the_clock_charges_what_a_client_needs_down_and_what_it_trained_up(runs_what_it_trains: bool) -> None:
    # A client that trains a quarter of the state: a FedARA prefix or a LoRA rank cut runs only that quarter
    # (a quarter each way); a client below a FedAdapter trial's depth runs the rest forward (all of it down).
    class Quarter(FedAvg):
        def transfer_share(self, client_id: int) -> float:
            return 0.25

        def download_share(self, client_id: int) -> float:
            return 0.25 if runs_what_it_trains else 1.0

    cost = CostModel("tx2", bandwidth_mbps=1.0)
    server = FederatedServer(Quarter(1, seed=0), num_clients=1, cost_model=cost)
    state = {"w": torch.zeros(250_000)}  # 1 MB of float32
    server.initialize(state)
    server.open_round(0)
    assert server.submit(ClientUpdate(0, 0, 10, {"w": torch.ones(250_000)}, {"sim_compute_s": 2.0}))
    server.close_round()
    record = server.finish_round().record
    down = 0.25 if runs_what_it_trains else 1.0
    expected = 2.0 + cost.comm_seconds(1e6 * down) + cost.comm_seconds(1e6 * 0.25)
    assert record.sim_round_s == pytest.approx(expected)


def test_a_round_is_predicted_with_its_own_bytes_each_way() -> None:
    cost = CostModel("tx2", bandwidth_mbps=1.0)
    model = torch.nn.Linear(2, 2)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    cost.step_flops = lambda *args, **kwargs: (0.0, 0.0)  # only the transfers differ
    device = cost.device
    same = cost.round_seconds(model, batch, 1, 4e6, device)
    assert same == pytest.approx(device.batch_seconds(0.0) + 2 * cost.comm_seconds(4e6))
    less_up = cost.round_seconds(model, batch, 1, 4e6, device, nbytes_up=1e6)
    assert same - less_up == pytest.approx(cost.comm_seconds(3e6))


def test_fedadapter_on_a_fleet_trains_each_client_at_its_depth(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=12, max_train_examples=240, max_val_examples=32, max_test_examples=16)
    pl.seed_everything(0)
    model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=2, lr=5e-3)
    cost = CostModel(fleet=Fleet(fractions={"rpi4b": 0.5, "tx2": 0.5}))
    sync = RoundSync(clients_per_round=2, seed=0, eval_every=10, cost_model=cost)
    upgrade = ProgressiveUpgrade(start_depth=2, window_s=0.5, max_val_batches=2)
    trainer = trainer_factory(max_epochs=6, callbacks=[sync, upgrade], limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    rows = sync.history
    assert all(r["min_train_depth"] == 1 and r["mean_train_depth"] == 1.5 for r in rows), "the rpi4b trains less"
    assert all(0 < r["pred_saved_s"] and r["pred_round_s"] < r["pred_uniform_round_s"] for r in rows)
    assert upgrade.decisions, "a decision window closed"
    assert all(p.requires_grad for n, p in model.named_parameters() if "adapter" in n)


def test_the_fleet_bench_runs_and_tabulates(tmp_path: Path) -> None:
    # A smoke run of two methods: the bench's own code (runs, table, plot) runs before anyone spends hours on it.
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/fleet.py", "--tiny", "--out", str(tmp_path), "--methods", "b_uniform_large"]
    # --rounds after --tiny's own 6: three rounds are enough to run every part, at half the suite's time.
    cmd += ["c_hetlora_exact", "--rounds", "3"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "| 1.0 | 0 | b_uniform_large |" in table and "| 1.0 | 0 | c_hetlora_exact |" in table
    assert (tmp_path / "fleet.png").stat().st_size > 10_000
    # Every round was also saved as it finished: a run cut off keeps its rounds, marked partial.
    import json

    whole = json.loads((tmp_path / "results.json").read_text())["1.0/0"]["c_hetlora_exact"]
    progress = json.loads((tmp_path / "progress_1.0_0_c_hetlora_exact.json").read_text())["1.0/0"]["c_hetlora_exact"]
    assert progress["partial"] is True and progress["rows"] == whole["rows"] and progress["best"] == whole["best"]


def _saved_run(points: list[tuple[float, float]]) -> dict:
    """A bench run as results.json saves it, from (simulated hour, validation accuracy) points."""
    accs = [a for _, a in points]
    return {
        "rows": [{"round": i, "sim_time_h": h, "val_acc": a} for i, (h, a) in enumerate(points)],
        "best": max(accs),
        "final": accs[-1],
        "wall_s": 1.0,
    }


def test_the_fleet_bench_reads_a_trial_groups_clock_at_its_earliest_hour(tmp_path: Path) -> None:
    # A trial-group method's clock restarts at each window (groups train side by side), so its rows are not
    # monotonic in time; hours to the target is the earliest hour a validated model reached it, not the first row.
    import json
    import subprocess
    import sys

    saved = {
        "1.0/0": {
            "a_uniform_small": _saved_run([(0.1, 0.5), (0.2, 0.8), (0.3, 0.8)]),
            # window 1: group 1 reaches 0.8 at 0.25 h; group 2, from 0 h again, at 0.05 h; then decided.
            "f_depth_ranks": _saved_run([(0.1, 0.5), (0.25, 0.8), (0.02, 0.4), (0.05, 0.8), (0.35, 0.8)]),
        }
    }
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/fleet.py", "--out", str(tmp_path / "out"), "--target-fraction", "1.0"]
    proc = subprocess.run(
        [*cmd, "--from-results", str(tmp_path / "saved.json")], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| 1.0 | 0 | a_uniform_small | 0.8000 | 0.8000 | 0.8000 | 0.200 |  |" in table
    assert "| 1.0 | 0 | f_depth_ranks | 0.8000 | 0.8000 | 0.8000 | 0.050 | 4.00x |" in table


def test_the_fleet_bench_summarises_seeds_with_their_own_targets(tmp_path: Path) -> None:
    # Several seeds: each seed keeps its own target and baselines; the summary gives the mean best accuracy,
    # the speed-up's geometric mean and on how many seeds goal 1 (>= 1.5x at >= the baselines' best) held.
    import json
    import subprocess
    import sys

    saved = {
        "1.0/0": {
            "a_uniform_small": _saved_run([(0.1, 0.5), (0.2, 0.8)]),
            "d_fedara_fleet": _saved_run([(0.05, 0.8), (0.1, 0.9)]),
        },
        "1.0/1": {
            "a_uniform_small": _saved_run([(0.1, 0.8)]),
            "d_fedara_fleet": _saved_run([(0.4, 0.7), (0.6, 0.8)]),
            # Left out of the target by --target-over; otherwise it would set seed 1's target to 0.5.
            "f_depth_ranks": _saved_run([(0.01, 0.5)]),
        },
    }
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/fleet.py", "--out", str(tmp_path / "out"), "--target-fraction", "1.0"]
    cmd += ["--target-over", "a_uniform_small", "d_fedara_fleet", "--from-results", str(tmp_path / "saved.json")]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| 1.0 | 0 | d_fedara_fleet | 0.9000 | 0.9000 | 0.8000 | 0.050 | 4.00x |" in table
    assert "| 1.0 | 1 | d_fedara_fleet | 0.8000 | 0.8000 | 0.8000 | 0.600 | 0.17x |" in table
    # sqrt(4 x 1/6) = 0.82; goal held on seed 0 only.
    assert "| 1.0 | d_fedara_fleet | 2 | 0.8500 (0.8000-0.9000) | 0.325 | 0.82x (4.00, 0.17) | 1 of 2 |" in table
    assert "| 1.0 | a_uniform_small | 2 | 0.8000 (0.8000-0.8000) | 0.150 |  |  |" in table
    assert "| 1.0 | f_depth_ranks | 1 | 0.5000 (0.5000-0.5000) | not reached (0 of 1 reached) |  |  |" in table
    assert (tmp_path / "out" / "fleet.png").stat().st_size > 10_000

    # A --target-over naming no method that ran is refused, naming the setting.
    bad = [sys.executable, "bench/fleet.py", "--out", str(tmp_path / "bad"), "--target-over", "e_fedadapter_fleet"]
    proc = subprocess.run(
        [*bad, "--from-results", str(tmp_path / "saved.json")], cwd=root, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "--target-over e_fedadapter_fleet" in proc.stderr, proc.stderr[-2000:]


def test_the_fleet_bench_reads_runs_up_to_a_common_horizon_and_tabulates_fedadapters_lead(tmp_path: Path) -> None:
    # Runs capped differently (rounds, simulated hours) are read up to one simulated hour, their best and final
    # accuracy too; goal 2 compares e against the faster of the fixed adapter configurations (a, b_adapters_large).
    import json
    import subprocess
    import sys

    saved = {
        "1.0/0": {
            "a_uniform_small": _saved_run([(0.1, 0.5), (0.3, 0.8), (0.6, 0.95)]),
            "b_adapters_large": _saved_run([(0.2, 0.6), (0.4, 0.8)]),
            "e_fedadapter_fleet": _saved_run([(0.05, 0.6), (0.1, 0.8), (0.45, 0.9)]),
            "d_fedara_fleet": _saved_run([(0.7, 0.9)]),  # validated nothing by the horizon: left out
        }
    }
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/fleet.py", "--out", str(tmp_path / "out"), "--target-fraction", "1.0"]
    cmd += ["--horizon-h", "0.5", "--from-results", str(tmp_path / "saved.json")]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "d_fedara_fleet] validated nothing by 0.5 simulated h" in proc.stdout
    table = (tmp_path / "out" / "table.md").read_text()
    # a's 0.95 at 0.6 h is past the horizon: its best is 0.8, which sets the target (the lowest best).
    assert "| 1.0 | 0 | a_uniform_small | 0.8000 | 0.8000 | 0.8000 | 0.300 |  |" in table
    assert "| 1.0 | 0 | e_fedadapter_fleet | 0.9000 | 0.9000 | 0.8000 | 0.100 | 3.00x |" in table
    assert "d_fedara_fleet" not in table
    # Goal 2: a reached the target at 0.3 h, b_adapters_large at 0.4 h; e at 0.1 h: 3x, met.
    assert "| 1.0 | 0 | 0.8000 | 0.100 | a_uniform_small | 0.300 | 3.00x | met |" in table
    # The saved results keep the whole runs, whatever the horizon.
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == saved


def test_the_fleet_bench_names_a_run_saved_part_way_with_the_hour_it_reached(tmp_path: Path) -> None:
    # A run cut off before the horizon is shown with the simulated hour it reached, so its best accuracy is not
    # read as the best by the horizon; one saved part-way but past the horizon is whole within it.
    import json
    import subprocess
    import sys

    saved = {
        "1.0/0": {
            "a_uniform_small": _saved_run([(0.1, 0.5), (0.3, 0.8)]),
            "e_fedadapter_fleet": {**_saved_run([(0.05, 0.6), (0.15, 0.8)]), "partial": True},
            "f_depth_ranks": {**_saved_run([(0.1, 0.7), (0.4, 0.85)]), "partial": True},
        }
    }
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/fleet.py", "--out", str(tmp_path / "out"), "--target-fraction", "1.0"]
    proc = subprocess.run(
        [*cmd, "--horizon-h", "0.35", "--from-results", str(tmp_path / "saved.json")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| 1.0 | 0 | e_fedadapter_fleet (stopped at 0.150 h) | 0.8000 | 0.8000 | 0.7000 | 0.150 |" in table
    assert "| 1.0 | 0 | f_depth_ranks | 0.7000 | 0.7000 | 0.7000 | 0.100 |" in table
    assert "| 1.0 | 0 | a_uniform_small | 0.8000 |" in table
