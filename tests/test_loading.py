"""The frozen base's load: its dtype, 4/8-bit quantization (bitsandbytes on the CPU), bad settings, DeepSpeed.

Everything runs on the tiny random Llama of conftest (2 layers, hidden 32) or the 2-layer MiniLM.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_fedpeft import FedPEFTModule, RoundSync
from lightning_fedpeft.errors import SetupError
from lightning_fedpeft.loading import BaseLoading, auto_dtype
from lightning_fedpeft.state import host_trainable_state, trainable_state

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _decoder(path: str, method: str = "lora", **settings: Any) -> FedPEFTModule:
    torch.manual_seed(0)
    return FedPEFTModule(path, task="causal_lm", method=method, rank=4, lr=1e-2, **settings)


def _batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 2000, (4, 12), generator=gen)
        labels = ids.clone()
        labels[:, :6] = -100  # a prompt: no target
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_a_bfloat16_base_is_loaded_as_such_and_the_trainables_stay_float32(tiny_llama: str) -> None:
    module = _decoder(tiny_llama, base_dtype="bfloat16")
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
    trained = {p.dtype for p in module.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert module.frozen_dtype == torch.bfloat16
    assert {t.dtype for t in host_trainable_state(module).values()} == {torch.float32}
    # The same model loaded in float32 and cast gives the same frozen weights: nothing but the dtype differs.
    reference = _decoder(tiny_llama)
    ref = dict(reference.named_parameters())
    for name, param in module.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, ref[name].to(torch.bfloat16)), name


def test_bfloat16_base_trains_a_round_under_bf16_mixed_on_the_cpu(tiny_llama: str, trainer_factory) -> None:
    module = _decoder(tiny_llama, base_dtype="bfloat16")
    sync = RoundSync(clients_per_round=2, num_clients=2, local_steps=2, seed=0)
    trainer = trainer_factory(max_epochs=1, callbacks=[sync], precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, train_dataloaders=None, datamodule=_ListData(_batches(4)))
    assert torch.isfinite(torch.tensor(sync.history[0]["train_loss"]))
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}


def test_a_half_base_under_full_precision_is_refused_by_name(tiny_llama: str, trainer_factory) -> None:
    module = _decoder(tiny_llama, base_dtype="bfloat16")
    sync = RoundSync(clients_per_round=1, num_clients=1, local_steps=1)
    trainer = trainer_factory(max_epochs=1, callbacks=[sync], precision="32-true")
    with pytest.raises(SetupError, match=r"model.base_dtype='bfloat16' under trainer.precision='32-true'.*bf16-mixed"):
        trainer.fit(module, datamodule=_ListData(_batches(1)))


def test_auto_picks_a_half_dtype_for_half_precision_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_dtype("bf16-mixed", gpu) == torch.bfloat16
    assert auto_dtype("bf16-true", gpu) == torch.bfloat16
    assert auto_dtype("16-mixed", gpu) == torch.float16
    assert auto_dtype("32-true", gpu) == torch.float32
    assert auto_dtype(None, gpu) == torch.float32
    assert auto_dtype("bf16-mixed", cpu) == torch.float32  # the CPU keeps float32 (as before)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4, a TX2
    assert auto_dtype("bf16-mixed", gpu) == torch.float16


def test_the_cli_resolves_auto_before_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_fedpeft.cli import resolve_base_dtype

    assert resolve_base_dtype("auto", "none", "auto", {"precision": "bf16-mixed"}) == "float32"  # no GPU here
    assert resolve_base_dtype("float16", "none", "auto", {"precision": "32-true"}) == "float16"  # named: kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_base_dtype("auto", "none", "auto", {"precision": "bf16-mixed"}) == "bfloat16"
    assert resolve_base_dtype("auto", "none", "auto", {"precision": "bf16-mixed", "accelerator": "cpu"}) == "float32"
    assert resolve_base_dtype("auto", "none", "auto", {"precision": "32-true"}) == "float32"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"base_dtype": "float8"}, r"model.base_dtype='float8' is unknown"),
        ({"quantization": "nf3"}, r"model.quantization='nf3' is unknown"),
        ({"load_device": "tpu"}, r"model.load_device='tpu' is unknown"),
        ({"load_device": "cuda"}, r"model.load_device='cuda': CUDA is not available"),
        ({"quantization": "nf4", "method": "full"}, r"model.quantization='nf4'.*model.method='full'"),
        ({"quantization": "int8", "method": "freeze"}, r"model.quantization='int8'.*model.method='freeze'"),
        ({"fused_kernels": True}, r"model.fused_kernels: liger-kernel's Triton kernels need a CUDA GPU"),
    ],
)
def test_bad_load_settings_are_refused_by_name_before_any_load(
    settings: dict, message: str, tiny_llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_fedpeft.module as module_file

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(module_file, "load_causal_lm", no_load)
    with pytest.raises(ValueError, match=message):
        _decoder(tiny_llama, **{"method": "lora", **settings})


def test_quantization_without_bitsandbytes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install"):
        BaseLoading("auto", "nf4").check("lora", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "svd"])
def test_a_quantized_base_carries_float32_adapters_only(quantization: str, method: str, tiny_llama: str) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    module = _decoder(tiny_llama, method=method, quantization=quantization)
    kind = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    quantized = [name for name, m in module.model.named_modules() if isinstance(m, kind)]
    assert len(quantized) == 2 * len(LLAMA_TARGETS)  # every linear kind of both layers
    state = host_trainable_state(module)
    assert state and {t.dtype for t in state.values()} == {torch.float32}
    assert all(("lora_" in k) for k in state), sorted(state)[:3]
    batch = _batches(1)[0]
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(module.get_parameter(k).grad is not None for k in trainable_state(module))


def test_bottleneck_adapters_train_over_a_4bit_base(tiny_llama: str) -> None:
    pytest.importorskip("bitsandbytes")
    module = _decoder(tiny_llama, method="adapter", width=8, quantization="nf4")
    state = host_trainable_state(module)
    assert state and all("adapter" in k for k in state) and {t.dtype for t in state.values()} == {torch.float32}
    loss = module.training_step(_batches(1)[0], 0)
    loss.backward()
    assert torch.isfinite(loss) and all(module.get_parameter(k).grad is not None for k in state)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_trains_as_a_bare_peft_loop_on_the_same_quantized_base(
    quantization: str, tiny_llama: str, trainer_factory
) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    batches = _batches(3)
    module = _decoder(tiny_llama, quantization=quantization)
    start = {k.removeprefix("model."): v.clone() for k, v in trainable_state(module).items()}
    losses: list[float] = []
    trainer = trainer_factory(max_steps=3, callbacks=[_LossLog(losses)])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))

    kwargs = BaseLoading("float32", quantization).from_pretrained_kwargs(torch.device("cpu"), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True, **kwargs)
    bare = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    bare.load_state_dict(start, strict=False)
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    bare.train()
    bare_losses = []
    for batch in batches:
        loss = bare(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bare_losses.append(float(loss))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(bare_losses), rtol=1e-5, atol=1e-6)
    ours = {k.removeprefix("model."): v for k, v in trainable_state(module).items()}
    theirs = {k: v for k, v in bare.named_parameters() if v.requires_grad}
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(start[k], ours[k]) for k in ours)  # it did train


def test_a_quantized_run_resumes_from_a_checkpoint_of_its_trainable_tensors(
    tiny_llama: str, tmp_path: Any, trainer_factory: Any
) -> None:
    pytest.importorskip("bitsandbytes")

    def run(rounds: int, ckpt: str | None = None) -> tuple[FedPEFTModule, pl.Trainer]:
        module = _decoder(tiny_llama, quantization="nf4")
        sync = RoundSync(clients_per_round=1, num_clients=2, local_steps=2, seed=3)
        trainer = trainer_factory(max_epochs=rounds, callbacks=[sync], limit_val_batches=0)
        trainer.fit(module, datamodule=_ListData(_batches(4)), ckpt_path=ckpt)
        return module, trainer

    straight, _ = run(2)
    first, trainer = run(1)
    trainer.save_checkpoint(tmp_path / "round1.ckpt")
    saved = torch.load(tmp_path / "round1.ckpt", weights_only=False)["state_dict"]
    assert set(saved) == set(trainable_state(first))  # no packed 4-bit tensor in it
    resumed, _ = run(2, str(tmp_path / "round1.ckpt"))
    for name, tensor in trainable_state(straight).items():
        assert torch.equal(tensor, trainable_state(resumed)[name]), name


def test_the_cli_refuses_deepspeed_without_a_gpu_in_one_line(capsys: pytest.CaptureFixture) -> None:
    from lightning_fedpeft.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--trainer.strategy=deepspeed_stage_2", "--data.corpus=stackoverflow"], run=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.strategy='deepspeed_stage_2'" in err[0] and "CUDA GPUs only" in err[0]


def test_roundsync_refuses_zero_stage_3_and_resets_a_zero_optimizer() -> None:
    from lightning_fedpeft.callbacks.zero_reset import deepspeed_stage, prepare_deepspeed, reset_zero_optimizer

    class DeepSpeedStrategy:  # the name Lightning's strategy has; only its config and engine are read
        def __init__(self, stage: int, engine: Any = None) -> None:
            self.config = {"zero_optimization": {"stage": stage}}
            self.deepspeed_engine = engine

    with pytest.raises(ValueError, match="ZeRO stage 3 partitions the parameters.*use stage 2"):
        prepare_deepspeed(DeepSpeedStrategy(3), 8)
    stage2 = DeepSpeedStrategy(2)
    prepare_deepspeed(stage2, 8)
    # Lightning would ask the round's loader for the batch size before the first round exists (seen on a GPU)
    assert stage2.config["train_micro_batch_size_per_gpu"] == 8
    told = DeepSpeedStrategy(2)
    told.config["train_micro_batch_size_per_gpu"] = 4
    prepare_deepspeed(told, 8)
    assert told.config["train_micro_batch_size_per_gpu"] == 4  # the user's own setting stays
    assert deepspeed_stage(stage2) == 2 and deepspeed_stage(object()) is None

    # A ZeRO optimizer keeps float32 master weights apart from the module's: after a client's state is
    # loaded into the module, they must follow it, and the moments must start anew.
    param = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    inner.step()
    assert inner.state

    class ZeroOptimizer:
        def __init__(self) -> None:
            self.optimizer, self.master = inner, param.detach().clone()

        def _restore_from_bit16_weights(self) -> None:
            self.master.copy_(param.detach())

    engine = type("Engine", (), {"optimizer": ZeroOptimizer()})()
    with torch.no_grad():
        param.fill_(7.0)  # the next client's state
    reset_zero_optimizer(DeepSpeedStrategy(2, engine))
    assert torch.equal(engine.optimizer.master, torch.full((3,), 7.0)) and not inner.state


class _LossLog(pl.Callback):
    def __init__(self, losses: list[float]) -> None:
        self.losses = losses

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


class _ListData(pl.LightningDataModule):
    """Fixed batches as a data module (one example per item: RoundSync lays the batches out itself)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4)


def test_the_gpu_qlora_config_builds_on_a_local_folder(tiny_llama: str, tmp_path: Any, cache_dir: str) -> None:
    """configs/llm/qlora_8b_gpu.yaml with the folder and file a user gives: here a tiny decoder, on the CPU."""
    pytest.importorskip("bitsandbytes")
    import json
    from pathlib import Path

    import bitsandbytes as bnb

    from lightning_fedpeft.cli import run_cli

    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i % 7}"}) + "\n" for i in range(80)))
    config = Path(__file__).resolve().parents[1] / "configs" / "llm" / "qlora_8b_gpu.yaml"
    cli = run_cli(
        [
            f"--config={config}",
            f"--model.model_name_or_path={tiny_llama}",
            f"--data.train_file={rows}",
            f"--data.cache_dir={cache_dir}",
            "--data.max_length=32",
            "--trainer.logger=false",
        ],
        run=False,
    )
    module = cli.model
    assert module.hparams.quantization == "nf4" and module.hparams.base_dtype == "float32"  # auto, on a CPU
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    assert cli.datamodule.hparams.length_bucketing and cli.trainer.precision == "bf16-mixed"
