"""RoundSync on a plain, user-written LightningModule and DataModule (no lightning_fedpeft classes)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedpeft import RoundSync
from lightning_fedpeft.data import partition_clients
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


def _reference_fedavg() -> nn.Sequential:
    """The same rounds in bare PyTorch: copy the global model, train each client, average by sample count."""
    data = _dataset()
    clients = partition_clients([0] * len(data), NUM_CLIENTS, "iid", seed=SEED)
    strategy = FedAvg(PER_ROUND, seed=SEED)
    global_net = _net()
    for round_idx in range(ROUNDS):
        plan = strategy.configure_round(round_idx, NUM_CLIENTS)
        sampler = RoundBatchSampler(clients, plan.client_ids, BATCH, local_steps=STEPS, seed=SEED, round_idx=round_idx)
        results = []
        for seg in sampler.segments:
            net = copy.deepcopy(global_net)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR, momentum=0.9)
            for batch in sampler.batches[seg.first_batch : seg.last_batch + 1]:
                x, y = data[batch]
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            results.append((len(clients[seg.client_id]), net[2].state_dict()))
        total = sum(n for n, _ in results)
        averaged = {k: sum(sd[k] * (n / total) for n, sd in results) for k in results[0][1]}
        global_net[2].load_state_dict(averaged)
    return global_net


def _sync() -> RoundSync:
    return RoundSync(clients_per_round=PER_ROUND, num_clients=NUM_CLIENTS, local_steps=STEPS, seed=SEED)


def _trainer(rounds: int, sync: RoundSync, **kwargs: object) -> pl.Trainer:
    """A quiet Trainer for ``rounds`` rounds with ``sync``; ``kwargs`` override the defaults."""
    args = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return pl.Trainer(max_epochs=rounds, callbacks=[sync], enable_model_summary=False, **(args | kwargs))


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
