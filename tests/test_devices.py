"""Devices and precision, checked on the CPU: which GPU a rank takes, that only CPU tensors reach the
transport, half precisions that keep the federated state in float32, clear errors, gradient checkpointing.

No GPU here: CUDA tensors are FakeTensorMode's (a device and a shape, no data), and the CUDA queries are
monkeypatched. What these tests cannot show (a real GPU's kernels, memory, DeepSpeed) is in
docs/distributed.md's GPU section as unverified.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from test_user_module import NUM_CLIENTS, SEED, UserData, UserModule
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_fedpeft import FedPEFTModule, RoundSync
from lightning_fedpeft.devices import check_precision, rank_devices
from lightning_fedpeft.launchers.codec import Codec
from lightning_fedpeft.launchers.embedded import EmbeddedLauncher
from lightning_fedpeft.state import require_host, to_host


def _torchrun(monkeypatch: pytest.MonkeyPatch, local_rank: int, gpus: int) -> None:
    for key, value in (("RANK", local_rank), ("WORLD_SIZE", 3), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_each_rank_takes_its_local_rank_gpu_or_the_one_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_devices("auto") == "auto"  # one process: Lightning's choice
    _torchrun(monkeypatch, local_rank=2, gpus=4)
    assert rank_devices("auto") == [2] and rank_devices(None, "gpu") == [2]
    assert rank_devices([3]) == [3] and rank_devices(1, "cuda") == 1  # the user's one device is kept
    assert rank_devices("auto", "cpu") == "auto"  # CPU ranks: one CPU device each, as Lightning does
    _torchrun(monkeypatch, local_rank=2, gpus=1)
    assert rank_devices("auto") == [0]  # three ranks share the node's one GPU
    _torchrun(monkeypatch, local_rank=1, gpus=0)
    assert rank_devices("auto") == "auto"  # no GPU: the CPU
    for many in (2, -1, "0,1", [0, 1]):
        with pytest.raises(ValueError, match=r"trainer\.devices=.*one client on one device"):
            rank_devices(many)


def test_what_leaves_a_gpu_client_is_on_the_cpu_and_in_float32() -> None:
    with FakeTensorMode():
        state = {
            "w": torch.empty(4, 3, device="cuda"),
            "b16": torch.empty(3, device="cuda", dtype=torch.bfloat16),
            "h16": torch.empty(2, device="cuda", dtype=torch.float16),
            "ids": torch.empty(2, device="cuda", dtype=torch.long),
        }
        with pytest.raises(ValueError, match=r"tensor 'w' is on cuda:0; only CPU tensors travel"):
            Codec().encode(state)
        with pytest.raises(ValueError, match="tensor beside the state 'w' is on cuda:0"):
            require_host(state, "tensor beside the state")
        host = to_host(state)
        assert {t.device.type for t in host.values()} == {"cpu"}
        assert {n: t.dtype for n, t in host.items()} == {
            "w": torch.float32,
            "b16": torch.float32,
            "h16": torch.float32,
            "ids": torch.long,
        }
        Codec("int8").encode(host)  # the transport takes it
    plain = {"w": torch.ones(2)}
    assert to_host(plain)["w"] is plain["w"]  # a CPU float32 state is not copied again


def test_a_precision_the_gpu_lacks_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"trainer.precision='bf16-mixed': Tesla T4 has no bfloat16; use '16-mixed'"):
        check_precision("bf16-mixed", torch.device("cuda", 0))
    check_precision("16-mixed", torch.device("cuda", 0))
    check_precision("bf16-mixed", torch.device("cpu"))  # CPUs compute bfloat16


class _Recording(EmbeddedLauncher):
    """The embedded transport, noting the device and dtype of every tensor it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, torch.dtype]] = set()

    def submit(self, update):  # noqa: ANN001, ANN201
        self.seen |= {(t.device.type, t.dtype) for t in [*update.state.values(), *update.tensors.values()]}
        return super().submit(update)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_half_precisions_train_with_fresh_optimizers_and_a_float32_federated_state(precision: str) -> None:
    pl.seed_everything(0)
    module, launcher = UserModule(), _Recording()
    start = module.net[2].weight.detach().clone()
    sync = RoundSync(clients_per_round=2, num_clients=NUM_CLIENTS, local_steps=3, seed=SEED, launcher=launcher)
    trainer = pl.Trainer(
        max_epochs=3,
        precision=precision,
        callbacks=[sync],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=UserData())
    assert launcher.seen == {("cpu", torch.float32)}  # bf16-true trains in bfloat16, the wire is float32
    assert all(t.dtype == torch.float32 for t in launcher.server.global_state.values())
    assert len(sync.history) == 3 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in sync.history)
    moved = (module.net[2].weight.detach().float() - start).abs().max()
    assert moved > 1e-3  # the model trained (and took the global state back, in its own dtype)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.net[2].weight.dtype == expected


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama: str) -> None:
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 60, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)  # the same LoRA initialisation both times
        module = FedPEFTModule(
            tiny_llama, task="causal_lm", method="lora", rank=4, gradient_checkpointing=checkpointing
        )
        base = module.model.get_base_model()
        assert base.is_gradient_checkpointing == checkpointing
        with torch.no_grad():  # LoRA's B starts at zero: give it values, so its A gets gradients too
            for name, param in module.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.linspace(-0.1, 0.1, param.numel()).view_as(param))
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
