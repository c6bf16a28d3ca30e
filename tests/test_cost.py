"""The simulated-time cost model: TX2 calibration, device profiles, sim time in the round log, int8 transfer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FedPEFTModule, RoundSync
from lightning_fedpeft.calibration import TX2_TABLE, bert_base_flops
from lightning_fedpeft.cost import CostModel, count_train_flops, load_device_profiles
from lightning_fedpeft.launchers.codec import Codec


def test_packaged_tx2_profile_reproduces_the_published_table_within_15_percent() -> None:
    tx2 = load_device_profiles()["tx2"]
    errors = {}
    for series, seconds in TX2_TABLE.items():
        for depth in (0, 1, 2, 4, 8, 12):
            predicted = tx2.batch_seconds(bert_base_flops(series, depth))
            errors[(series, depth)] = predicted / seconds[depth] - 1
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= 0.15, (worst, errors[worst])
    # The counts themselves order as the table does: cache < adapters < full layers at the same depth.
    assert bert_base_flops("adapter_cached", 4) < bert_base_flops("adapter", 4) < bert_base_flops("freeze", 4)


def test_relative_profiles_and_user_profile_files(tmp_path: Path) -> None:
    profiles = load_device_profiles()
    tx2, nano, rpi = profiles["tx2"], profiles["nano"], profiles["rpi4b"]
    assert nano.batch_seconds(1e11) == pytest.approx(2 * tx2.batch_seconds(1e11))
    assert rpi.batch_seconds(1e11) == pytest.approx(20 * tx2.batch_seconds(1e11))
    own = tmp_path / "devices.yaml"
    own.write_text("board: {flops_per_s: 1.0e9}\nslow_board: {like: board, slowdown: 3}\n")
    model = CostModel("slow_board", bandwidth_mbps=0.5, devices_file=str(own))
    assert model.device.batch_seconds(1e9) == pytest.approx(3.0)
    assert model.comm_seconds(1e6) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cost_model.device='tx2' is unknown"):
        CostModel("tx2", devices_file=str(own))
    own.write_text("loop_a: {like: loop_b}\nloop_b: {like: loop_a}\n")
    with pytest.raises(ValueError, match="loop"):
        load_device_profiles(own)
    with pytest.raises(ValueError, match="bandwidth_mbps"):
        CostModel("tx2", bandwidth_mbps=0)


def test_int8_transfer_quantizes_values_and_quarters_the_bytes() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(100, 10, generator=gen), "b": torch.randn(7, generator=gen)}
    int8 = Codec("int8")
    wire = int8.encode(state)
    received = int8.decode(wire)
    assert wire.nbytes == 1000 + 4 + 7 + 4 and wire.tensors["a"].values.dtype == torch.int8
    for k in state:
        err = (received[k] - state[k]).abs().max()
        assert 0 < err <= state[k].abs().max() / 127 / 2 + 1e-7
    plain = Codec("none").encode(state)
    assert plain.nbytes == 4 * 1007 and Codec.decode(plain)["a"] is state["a"]
    with pytest.raises(ValueError, match=r"federation\.compression='zip' is unknown; allowed: none, int8"):
        Codec("zip")


def test_int8_with_a_reference_quantizes_only_the_change() -> None:
    # Pre-trained-like weights (large, spread) plus a small fine-tuning change: quantizing the weights
    # themselves loses the change, quantizing the change keeps it to within half a step of its own scale.
    gen = torch.Generator().manual_seed(0)
    ref = {"w": 3.0 * torch.randn(200, 20, generator=gen), "shape_changed": torch.zeros(3)}
    delta = 1e-3 * torch.randn(200, 20, generator=gen)
    state = {"w": ref["w"] + delta, "shape_changed": torch.ones(5)}
    int8 = Codec("int8")
    wire = int8.encode(state, reference=ref)
    received = int8.decode(wire, reference=ref)
    assert wire.nbytes == 4000 + 4 + 5 + 4
    err = (received["w"] - state["w"]).abs().max()
    assert err <= delta.abs().max() / 127 / 2 + 1e-6
    plain = int8.decode(int8.encode(state))
    assert (plain["w"] - state["w"]).abs().max() > 10 * err
    assert torch.allclose(received["shape_changed"], torch.ones(5))  # no usable reference: values sent


def test_every_round_logs_simulated_time_that_grows_with_what_is_trained(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=6, max_train_examples=96, max_val_examples=32, max_test_examples=32)
    rows = {}
    for method, compression in (("adapter", "none"), ("full", "none"), ("full", "int8")):
        pl.seed_everything(0)
        model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method=method, depth=2, width=8)
        sync = RoundSync(clients_per_round=2, seed=0, cost_model=CostModel("tx2", 1.0), compression=compression)
        trainer = trainer_factory(max_epochs=2, callbacks=[sync], limit_val_batches=0)
        trainer.fit(model, datamodule=data)
        rows[(method, compression)] = sync.history
    for history in rows.values():
        clock = [row["sim_time_h"] for row in history]
        assert clock[0] > 0 and clock[1] == pytest.approx(clock[0] + history[1]["sim_round_s"] / 3600)
    adapter, full, full8 = (rows[k][0]["sim_round_s"] for k in rows)
    # Full fine-tuning moves ~30x more bytes at 1 MB/s and runs a longer backward than adapters.
    assert full > 10 * adapter
    # int8 transfer cuts the communication (about 4x fewer bytes) but not the compute.
    assert adapter < full8 < full
    assert rows[("full", "int8")][0]["wire_bytes_up"] < rows[("full", "none")][0]["bytes_up"] / 3.9


def test_a_cache_miss_costs_the_frozen_bottom_once_per_missed_example() -> None:
    torch.manual_seed(0)
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="adapter", depth=1, width=8, activation_cache_mb=8)
    ids = torch.randint(1000, 5000, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0])}
    cost = CostModel("tx2")
    cache = module.activation_cache
    cache(module.model, batch)  # 4 misses
    filling = cost.batch_seconds(module.model, batch, cache)
    cache(module.model, batch)  # 4 hits
    warm = cost.batch_seconds(module.model, batch, cache)
    # The bottom (embeddings + layer 0) of one example, counted on its own.
    one = {k: v[:1] for k, v in batch.items()}
    _, bottom_one = count_train_flops(module.model, one, cached=True)
    assert bottom_one > 0
    assert filling - warm == pytest.approx(4 * bottom_one / cost.device.flops_per_s, rel=1e-6)


@pytest.mark.parametrize(
    ("method", "cached"), [("adapter", False), ("adapter", True), ("lora", False), ("svd", False), ("full", False)]
)
def test_a_batch_costs_what_counting_it_gives_whatever_batch_came_first(method: str, cached: bool) -> None:
    # The count comes from probes of fixed lengths, so it is exact for any shape (attention's quadratic
    # share included) and two clients that see batches in a different order get the same seconds.
    torch.manual_seed(0)
    settings = {"depth": 1, "width": 8, "activation_cache_mb": 8 if cached else None} if method == "adapter" else {}
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method=method, **settings)
    batches = []
    for size, length in ((3, 29), (2, 70), (5, 11)):
        ids = torch.randint(1000, 5000, (size, length))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(size) % 3})
    forward, backward = CostModel("tx2"), CostModel("tx2")
    seen_forward = [forward.step_flops(module.model, b, cached) for b in batches]
    seen_backward = [backward.step_flops(module.model, b, cached) for b in reversed(batches)][::-1]
    assert seen_forward == seen_backward
    for batch, (step, bottom) in zip(batches, seen_forward, strict=True):
        counted_step, counted_bottom = count_train_flops(module.model, batch, cached=cached)
        assert step == pytest.approx(counted_step, rel=1e-9)
        assert bottom == pytest.approx(counted_bottom, rel=1e-9)
    # Attention's quadratic share is in it: a token costs more in a longer sequence (linear scaling from
    # the first batch, the old rule, would price every token alike).
    per_token = [step / batch["input_ids"].numel() for batch, (step, _) in zip(batches, seen_forward, strict=True)]
    assert per_token[2] < per_token[0] < per_token[1]


def test_counting_only_what_autograd_runs_skips_the_lowest_layers_input_gradients() -> None:
    # The cost model prices backward down to the lowest trainable layer's input (the published table's
    # rule); the cache bench's FLOP ratio counts what autograd runs, which stops at the adapter.
    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    adapter = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="adapter", depth=1, width=8).model
    priced, _ = count_train_flops(adapter, batch, cached=True)
    run, _ = count_train_flops(adapter, batch, cached=True, through_lowest_layer=False)
    assert 0 < run < priced
    full = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="full").model
    assert count_train_flops(full, batch)[0] == count_train_flops(full, batch, through_lowest_layer=False)[0]


def test_max_sim_hours_ends_fit_after_the_round_that_reaches_it(stackoverflow, trainer_factory) -> None:
    data = stackoverflow(num_clients=6, max_train_examples=96, max_val_examples=32, max_test_examples=32)

    def fit(max_sim_hours: float | None) -> list[dict]:
        pl.seed_everything(0)
        model = FedPEFTModule(num_labels=data.num_labels, num_hidden_layers=2, method="adapter", depth=2, width=8)
        sync = RoundSync(clients_per_round=2, seed=0, cost_model=CostModel("tx2", 1.0), max_sim_hours=max_sim_hours)
        trainer = trainer_factory(max_epochs=5, callbacks=[sync], limit_val_batches=0)
        trainer.fit(model, datamodule=data)
        return sync.history

    clock = [row["sim_time_h"] for row in fit(None)]
    assert len(clock) == 5
    # A budget inside round 2 (0-based): that round still finishes, and nothing runs after it.
    budget = (clock[1] + clock[2]) / 2
    history = fit(budget)
    assert [row["round"] for row in history] == [0, 1, 2]
    assert history[-2]["sim_time_h"] < budget <= history[-1]["sim_time_h"]
    assert [row["sim_time_h"] for row in history] == pytest.approx(clock[:3])


def test_counting_a_step_leaves_the_random_stream_alone() -> None:
    # The cost model probes a configuration the first time it meets it, in the middle of training (a
    # resumed run meets it at another time than the run it continues): the dropout draws must not move.
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="adapter", depth=1, width=8).train()
    ids = torch.randint(1000, 5000, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    for cached in (False, True):
        torch.manual_seed(3)
        before = torch.get_rng_state()
        count_train_flops(module.model, batch, cached=cached)
        assert torch.equal(torch.get_rng_state(), before), f"cached={cached}"


def test_a_configuration_is_counted_once_per_process_and_again_when_it_changes(monkeypatch) -> None:
    # Counts are shared by every cost model of the process (a resumed run, a bench's next method meet the
    # same configurations again): a second model of the same configuration, or a batch of the same shape
    # with other values, costs no recount; training another part, or another dtype, does.
    from lightning_fedpeft import cost

    calls: list[int] = []
    real = cost.count_train_flops
    monkeypatch.setattr(cost, "count_train_flops", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cost, "_COUNTS", {})
    torch.manual_seed(0)
    model = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="lora", rank=2).model
    ids = torch.randint(1000, 5000, (2, 9))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1])}
    first = CostModel("tx2").step_flops(model, batch, cached=False)
    assert len(calls) == 4  # three lengths and the two-example probe
    other = {"input_ids": torch.randint(1000, 5000, (2, 9)), "labels": torch.tensor([2, 2])}
    assert CostModel("rpi4b").step_flops(model, other, cached=False) == first
    assert len(calls) == 4
    next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(False)
    fewer = CostModel("tx2").step_flops(model, batch, cached=False)
    assert len(calls) == 8 and fewer[0] < first[0]
    memory = CostModel("tx2").memory_bytes(model, batch)
    assert memory == cost.train_memory_bytes(model, batch)
    model.double()
    assert CostModel("tx2").memory_bytes(model, batch) > memory


def test_a_fleet_client_below_the_configurations_depth_is_priced_with_its_frozen_layers() -> None:
    # Per train depth on every device: backward stops at the lowest trained adapter, the whole state goes down
    # and only what the client trained comes back; the frozen adapters train again afterwards.
    torch.manual_seed(0)
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="adapter", depth=2, width=8)
    ids = torch.randint(1000, 5000, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0])}
    cost = CostModel("tx2", bandwidth_mbps=0.01)
    cost.client_devices = ["rpi4b", "tx2", "rpi4b"]
    params = dict(module.model.named_parameters())
    bottom = [p for n, p in params.items() if "layer.0.output.adapter" in n]
    total = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)

    @contextlib.contextmanager
    def train_depth(depth: int):
        frozen = bottom if depth == 1 else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield frozen
        finally:
            for p in frozen:
                p.requires_grad_(True)

    rows = cost.train_depth_costs(module.model, batch, 3.0, total, [2, 1], train_depth)
    assert [r["depth"] for r in rows] == [2, 1] and all(p.requires_grad for p in bottom)
    assert set(rows[0]["seconds"]) == {"rpi4b", "tx2"}
    frozen_bytes = sum(p.numel() * p.element_size() for p in bottom)
    for name, profile in cost.profiles.items():
        if name not in rows[0]["seconds"]:
            continue
        assert rows[0]["seconds"][name] == cost.round_seconds(module.model, batch, 3.0, total, profile)
        with train_depth(1):
            by_hand = cost.round_seconds(module.model, batch, 3.0, total, profile, nbytes_up=total - frozen_bytes)
        assert rows[1]["seconds"][name] == by_hand < rows[0]["seconds"][name]
    assert rows[1]["memory_bytes"] < rows[0]["memory_bytes"]
