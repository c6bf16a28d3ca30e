"""RoundSync on a plain, user-written LightningModule and DataModule (no lightning_fedpeft classes)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedpeft import ClientContext, ClientResult, FederatedAlgorithm, FedProx, RoundSync
from lightning_fedpeft.data import partition_clients
from lightning_fedpeft.protocol import RoundPlan
from lightning_fedpeft.rounds import RoundBatchSampler
from lightning_fedpeft.strategy import FedAvg

# Momentum gives the optimizer a state, so the test also checks it is fresh for every client.
BATCH, LR, NUM_CLIENTS, PER_ROUND, STEPS, ROUNDS, SEED = 5, 0.1, 4, 2, 3, 3, 1


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    net[0].requires_grad_(False)  # a frozen "backbone": must never change, must never travel
    return net


class UserModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def _dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(42, 4, generator=gen), torch.randint(0, 3, (42,), generator=gen))


class UserData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_dataset(), batch_size=BATCH, shuffle=True)


def _reference_fedavg(mu: float = 0.0, steps_of: Callable[[int], int] | None = None) -> nn.Sequential:
    """The same rounds in bare PyTorch: copy the global model, train each client, average by sample count.

    ``mu``: FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` added to every local loss;
    ``steps_of``: each client's own number of local steps (default: ``STEPS`` for all).
    """
    data = _dataset()
    clients = partition_clients([0] * len(data), NUM_CLIENTS, "iid", seed=SEED)
    strategy = FedAvg(PER_ROUND, seed=SEED)
    global_net = _net()
    for round_idx in range(ROUNDS):
        plan = strategy.configure_round(round_idx, NUM_CLIENTS)
        told = {c: {"local_steps": steps_of(c)} for c in plan.client_ids} if steps_of else None
        sampler = RoundBatchSampler(
            clients, plan.client_ids, BATCH, local_steps=STEPS, seed=SEED, round_idx=round_idx, instructions=told
        )
        anchor = [p.detach().clone() for p in global_net[2].parameters()]
        results = []
        for seg in sampler.segments:
            net = copy.deepcopy(global_net)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR, momentum=0.9)
            for batch in sampler.batches[seg.first_batch : seg.last_batch + 1]:
                x, y = data[batch]
                opt.zero_grad()
                prox = sum(((p - a) ** 2).sum() for p, a in zip(net[2].parameters(), anchor, strict=True))
                loss = nn.functional.cross_entropy(net(x), y) + mu / 2 * prox
                loss.backward()
                opt.step()
            results.append((len(clients[seg.client_id]), net[2].state_dict()))
        total = sum(n for n, _ in results)
        averaged = {k: sum(sd[k] * (n / total) for n, sd in results) for k in results[0][1]}
        global_net[2].load_state_dict(averaged)
    return global_net


def _sync(**kwargs: Any) -> RoundSync:
    return RoundSync(clients_per_round=PER_ROUND, num_clients=NUM_CLIENTS, local_steps=STEPS, seed=SEED, **kwargs)


def _trainer(rounds: int, sync: RoundSync, *algorithms: Callback, **kwargs: object) -> pl.Trainer:
    """A quiet Trainer for ``rounds`` rounds with ``sync`` (and ``algorithms``); ``kwargs`` override the defaults."""
    args = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    callbacks = [sync, *algorithms]
    return pl.Trainer(max_epochs=rounds, callbacks=callbacks, enable_model_summary=False, **(args | kwargs))


def test_round_sync_federates_a_plain_user_module_exactly_like_hand_written_fedavg() -> None:
    module = UserModule()
    frozen_before = module.net[0].weight.detach().clone()
    sync = _sync()
    trainer = _trainer(ROUNDS, sync)
    trainer.fit(module, datamodule=UserData())

    reference = _reference_fedavg()
    assert torch.allclose(module.net[2].weight, reference[2].weight, atol=1e-6)
    assert torch.allclose(module.net[2].bias, reference[2].bias, atol=1e-6)
    assert not torch.allclose(module.net[2].weight, _net()[2].weight)  # it did train
    assert torch.equal(module.net[0].weight, frozen_before)
    # Only the trainable head travels: 8*3 + 3 float32 values per client and direction.
    assert all(row["bytes_up"] == PER_ROUND * (8 * 3 + 3) * 4 for row in sync.history)
    assert len(sync.history) == ROUNDS
    # The user's loader is restored once fit is over.
    assert "train_dataloader" not in trainer.datamodule.__dict__


def test_round_sync_needs_num_clients_without_client_indices() -> None:
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[RoundSync(clients_per_round=2)], logger=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="num_clients"):
        trainer.fit(UserModule(), datamodule=UserData())


def test_round_sync_refuses_loaders_passed_straight_to_fit() -> None:
    sync = RoundSync(clients_per_round=2, num_clients=4)
    trainer = pl.Trainer(max_epochs=1, callbacks=[sync], logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="datamodule="):
        trainer.fit(UserModule(), train_dataloaders=UserData().train_dataloader())


def test_round_history_rides_in_the_checkpoint_and_a_resumed_run_continues(tmp_path) -> None:
    first = _sync()
    t1 = _trainer(2, first, default_root_dir=tmp_path, enable_checkpointing=True)
    t1.fit(UserModule(), datamodule=UserData())
    ckpt = tmp_path / "two_rounds.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = _sync()
    module = UserModule()
    _trainer(ROUNDS, resumed, default_root_dir=tmp_path, enable_checkpointing=True).fit(
        module, datamodule=UserData(), ckpt_path=ckpt
    )
    assert [row["round"] for row in resumed.history] == [0, 1, 2]
    # Resuming from round 2 lands on the same global model as the uninterrupted run.
    reference = _reference_fedavg()
    assert torch.allclose(module.net[2].weight, reference[2].weight, atol=1e-6)


# -- the algorithm interface on a plain module: per-client instructions, FedProx -----------------------------------
class StepsByClient(FedAvg):
    """A strategy that tells every client its own number of local steps (and a note of its own)."""

    def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
        plan = super().configure_round(round_idx, num_clients)
        plan.instructions = {c: {"local_steps": 1 + c % 3, "note": f"client {c}"} for c in plan.client_ids}
        return plan


class RecordClients(FederatedAlgorithm):
    """Records what every client was told and how many local steps it took."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, dict, int]] = []
        self._steps = 0

    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        self._steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._steps += 1

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        self.seen.append((ctx.round, ctx.client_id, dict(ctx.instructions), self._steps))
        return ClientResult(metrics={"steps_taken": float(self._steps)})


def test_two_clients_of_a_round_get_different_instructions_and_each_trains_by_its_own() -> None:
    module, recorder = UserModule(), RecordClients()
    sync = _sync(strategy=StepsByClient(PER_ROUND, seed=SEED))
    _trainer(ROUNDS, sync, recorder).fit(module, datamodule=UserData())
    assert len(recorder.seen) == ROUNDS * PER_ROUND
    for _, client, told, steps in recorder.seen:
        assert told == {"local_steps": 1 + client % 3, "note": f"client {client}"} and steps == 1 + client % 3
    assert any(len({steps for r, _, _, steps in recorder.seen if r == k}) == 2 for k in range(ROUNDS))
    # Each client trained exactly its instructed steps: the bare-PyTorch rounds with those steps agree.
    reference = _reference_fedavg(steps_of=lambda c: 1 + c % 3)
    assert torch.allclose(module.net[2].weight, reference[2].weight, atol=1e-6)
    assert not torch.allclose(module.net[2].weight, _reference_fedavg()[2].weight, atol=1e-4)
    assert all("steps_taken" in row for row in sync.history)  # an algorithm's numbers join the round's row


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedprox_is_bare_pytorch_with_the_proximal_term_in_the_loss(mu: float) -> None:
    module = UserModule()
    sync = _sync()
    _trainer(ROUNDS, sync, FedProx(mu=mu)).fit(module, datamodule=UserData())
    reference = _reference_fedavg(mu=mu)
    assert torch.allclose(module.net[2].weight, reference[2].weight, atol=1e-6)
    assert torch.allclose(module.net[2].bias, reference[2].bias, atol=1e-6)
    plain = _reference_fedavg()
    assert torch.allclose(reference[2].weight, plain[2].weight) == (mu == 0.0)  # the term changes training
    assert all(row["fedprox_distance"] > 0 for row in sync.history)


def test_fedprox_takes_a_per_client_mu_and_refuses_a_bad_one() -> None:
    class MuByClient(FedAvg):
        def configure_round(self, round_idx: int, num_clients: int) -> RoundPlan:
            plan = super().configure_round(round_idx, num_clients)
            plan.instructions = {c: {"fedprox_mu": 0.5} for c in plan.client_ids}
            return plan

    module, sync = UserModule(), _sync(strategy=MuByClient(PER_ROUND, seed=SEED))
    _trainer(ROUNDS, sync, FedProx(mu=0.0)).fit(module, datamodule=UserData())
    assert torch.allclose(module.net[2].weight, _reference_fedavg(mu=0.5)[2].weight, atol=1e-6)
    with pytest.raises(ValueError, match=r"fedprox\.mu=-1 must be a finite number >= 0"):
        FedProx(mu=-1)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class UserAdaLoraModule(pl.LightningModule):
    """A user's own module holding a peft AdaLoRA model: no lightning_fedpeft class, no set_trainable_state."""

    def __init__(self) -> None:
        super().__init__()
        from peft import AdaLoraConfig, get_peft_model

        torch.manual_seed(0)
        config = AdaLoraConfig(init_r=4, target_r=4, target_modules=["a", "b"], modules_to_save=["head"], total_step=1)
        self.net = get_peft_model(_TwoLayers(), config)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def test_fedara_allocates_ranks_and_prunes_modules_of_a_users_own_adalora_module() -> None:
    from lightning_fedpeft.fedara import ModulePruning, RankAllocation
    from lightning_fedpeft.state import trainable_state
    from lightning_fedpeft.tuners.svd import layer_rank, svd_layers

    module = UserAdaLoraModule()
    sync = _sync()
    allocation = RankAllocation(target_rank=0.5, warmup_rounds=1, final_rounds=1)  # 8 triplets fall to 1
    _trainer(5, sync, allocation, ModulePruning(), limit_val_batches=0).fit(module, datamodule=UserData())
    assert [int(r["active_ranks"]) for r in sync.history][0] == 8 and int(sync.history[-1]["active_ranks"]) == 1
    assert int(sync.history[-1]["live_modules"]) == 1  # the module that lost its last triplet was pruned
    live = svd_layers(module)
    assert len(live) == 1 and sum(layer_rank(layer) for layer in live.values()) == 1
    pruned = "net.base_model.model.a" if "net.base_model.model.b" in live else "net.base_model.model.b"
    assert type(module.get_submodule(pruned)) is nn.Linear  # the frozen base layer is back in its place
    final = allocation.strategy.full  # the server's full-rank record; the module holds the packed state
    mine = trainable_state(module)
    assert not any(k.startswith(pruned + ".") for k in mine) and any(k.startswith(pruned + ".") for k in final)


class UserBertModule(pl.LightningModule):
    """A user's own module holding a tiny Hugging Face BERT under peft (AdaLoRA or LoRA) as ``self.net``."""

    def __init__(self, tuner: str) -> None:
        super().__init__()
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        shape = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
        bert = BertForSequenceClassification(
            BertConfig(vocab_size=50, num_labels=3, max_position_embeddings=32, **shape)
        )
        targets = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
        config = AdaLoraConfig(init_r=4, target_r=4, total_step=1, **targets) if tuner == "adalora" else None
        self.net = get_peft_model(bert, config or LoraConfig(r=4, **targets))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


class UserTexts(pl.LightningDataModule):
    """A user's own data: dict batches of token ids, as a Hugging Face collator gives them."""

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(3)
        ids, labels = torch.randint(1, 50, (40, 12), generator=gen), torch.randint(0, 3, (40,), generator=gen)
        rows = [
            {"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(40)
        ]
        return DataLoader(rows, batch_size=4, shuffle=True)


def _fleet_sync() -> RoundSync:
    from lightning_fedpeft.cost import CostModel
    from lightning_fedpeft.fleet import Fleet

    fleet = Fleet(fractions={"rpi4b": 0.5, "orin_nano": 0.5})
    return RoundSync(clients_per_round=4, num_clients=8, local_steps=2, seed=SEED, cost_model=CostModel(fleet=fleet))


def test_fedara_sizes_each_client_of_a_fleet_on_a_users_own_hugging_face_module() -> None:
    # Issue 32: the fleet's nested prefixes, rank allocation and pruning on a user's module whose peft model is
    # not called `model` (the cost model finds it: cost.priced_model).
    from lightning_fedpeft.fedara import ModulePruning, RankAllocation

    sync = _fleet_sync()
    allocation = RankAllocation(target_rank=0.5, warmup_rounds=1, final_rounds=1)  # 16 triplets fall to 2
    _trainer(4, sync, allocation, ModulePruning(), limit_val_batches=0).fit(UserBertModule("adalora"), UserTexts())
    first, last = sync.history[0], sync.history[-1]
    assert first["active_ranks"] == 16 and first["min_client_triplets"] < first["mean_client_triplets"] < 16
    assert first["pred_saved_s"] > 0  # the Pis trained a smaller prefix than the global one, and so saved time
    assert last["active_ranks"] == 2 and last["live_modules"] < first["live_modules"]  # allocated, then pruned
    assert all(r["sim_round_s"] > 0 for r in sync.history)


def test_lora_ranks_per_device_on_a_users_own_hugging_face_module() -> None:
    from lightning_fedpeft import HeterogeneousLoRA
    from lightning_fedpeft.state import trainable_state

    module = UserBertModule("lora")
    before = {k: v.clone() for k, v in trainable_state(module).items()}
    sync = _fleet_sync()
    hetero = HeterogeneousLoRA(ranks={"rpi4b": 1, "orin_nano": 4})
    _trainer(3, sync, hetero, limit_val_batches=0).fit(module, UserTexts())
    ranks = [r["mean_client_rank"] for r in sync.history]
    assert all(1 <= r <= 4 for r in ranks) and any(1 < r < 4 for r in ranks), ranks  # both devices' ranks trained
    after = trainable_state(module)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_a_cost_model_refuses_tuple_batches_before_training_naming_the_setting() -> None:
    from lightning_fedpeft.cost import CostModel
    from lightning_fedpeft.errors import SetupError

    trainer = _trainer(1, _sync(cost_model=CostModel()), limit_val_batches=0)
    with pytest.raises(SetupError, match=r"federation.cost_model .* the training batch is a list"):
        trainer.fit(UserModule(), datamodule=UserData())
    assert trainer.global_step == 0
