"""GPU clients, measured in one prepared run: load, step speed and memory, QLoRA at 8 B, ranks, equivalence.

Every model is built here with random weights in the real shapes (nothing is downloaded) and saved to a
temporary folder, so the package's own loader reads it as it would read a user's model:

* ``llama1b``: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV, FFN 8192, vocab 128256, tied);
* ``llama8b``: Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 / 8 heads, FFN 14336, vocab 128256), in 4-bit;
* ``minilm``: all-MiniLM-L6-v2's shape (BERT, hidden 384, 6 layers, 12 heads, FFN 1536, vocab 30522).

Sections (each prints its rows and goes into the JSON; a section that fails or runs out of time says so and
the others go on):

* ``ceiling``: an 8192^3 bf16 matrix product on random data, the chip's practical rate;
* ``load``: the 1 B model loaded through FedPEFTModule (``base_dtype: bfloat16``, straight to the GPU) in a
  fresh process: seconds, and host RAM (peak RSS over the RSS before the load) against the bf16 weights;
* ``step``: a client step at batch 8 x 512 tokens (the last 128 of each row are the response, the loss is on
  them only), Trainer + RoundSync against a bare peft loop on the same model, batches and recipe: LoRA r8 on
  the seven linear kinds under bf16-mixed and bf16-true, with liger-kernel's fused kernels, and FedARA (SVD
  r8 + RankAllocation, importance on). Tokens/s, MFU (FLOPs of one step counted by torch's FlopCounterMode,
  over the H100/H200 SXM dense bf16 datasheet rate, 989 TFLOP/s), peak GPU memory, ours / bare;
* ``qlora8b``: the 8 B model in NF4 with LoRA r16 (gradient checkpointing): load, one round of two clients x
  5 steps at 8 x 512, peak GPU memory;
* ``ranks``: ``fedpeft fit`` on a small decoder with 2 torchrun ranks sharing the GPU against one process:
  s/round and whether the rounds' losses agree;
* ``equivalence`` (a check, not a timing): the same 3 rounds on the CPU and on the GPU, dropout off: every
  round's loss within 1e-5 relative in fp32, and within a stated tolerance under bf16-mixed;
* ``minilm``: MiniLM adapters, fp32, batch 32 x 128: ours / bare;
* ``deepspeed``: the step under DeepSpeed ZeRO-2 against without (when deepspeed is installed).

    python bench/gpu.py --out bench/out/gpu.json          # on a GPU, about 6 minutes
    python bench/gpu.py --tiny --out /tmp/gpu_tiny.json   # a dry run on the CPU: tiny shapes, every path

``--tiny`` runs every section at toy sizes on whatever device is there (the CPU here), to check the script,
not to measure anything.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import quiet_trainer
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fedpeft import FedPEFTModule, ModulePruning, RankAllocation, RoundSync  # noqa: E402

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "llama1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
    "llama8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
    ),
    "minilm": dict(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, vocab_size=30522
    ),
}  # fmt: skip
TINY = {
    "llama1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "minilm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512),
}  # fmt: skip


class Bench:
    """The run's settings, clock, device and results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.device = torch.device("cuda") if self.cuda else torch.device("cpu")
        self.deadline = time.monotonic() + args.budget_s
        self.work = Path(tempfile.mkdtemp(prefix="fedpeft-gpu-"))
        self.shapes = TINY if self.tiny else SHAPES
        self.batch, self.seq, self.response = (2, 32, 8) if self.tiny else (8, 512, 128)
        self.warmup, self.steps = (1, 2) if self.tiny else (5, 20)
        self.results: dict[str, Any] = {
            "machine": torch.cuda.get_device_name(0) if self.cuda else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "tiny": self.tiny,
            "date": time.strftime("%Y-%m-%d"),
        }
        self.folders: dict[str, Path] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def accelerator(self) -> str:
        return "gpu" if self.cuda else "cpu"

    def reset_memory(self) -> None:
        gc.collect()  # a finished Trainer and its module hold GPU memory until their cycles are collected
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


# -- models built here -------------------------------------------------------------------------------------
def decoder_folder(bench: Bench, name: str) -> Path:
    """A random Llama of ``name``'s shape saved in bf16 (once per run)."""
    if name in bench.folders:
        return bench.folders[name]
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = bench.work / name
    config = LlamaConfig(**bench.shapes[name], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    config.pad_token_id = 0
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(bench.device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.save_pretrained(folder, max_shard_size="5GB")
    write_tokenizer(folder, config.vocab_size)
    del model
    bench.reset_memory()
    print(f"  built {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    bench.folders[name] = folder
    return folder


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` ids ('w3' is id 3): what the data module needs, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]", unk_token="[UNK]"
    )
    fast.save_pretrained(folder)


class FixedRows(pl.LightningDataModule):
    """Rows of ``seq`` random tokens whose last ``response`` tokens are the target (labels -100 before)."""

    def __init__(self, n: int, seq: int, response: int, vocab: int, batch: int, classes: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(4, vocab, (n, seq), generator=gen)
        if classes:
            labels = torch.randint(0, classes, (n,), generator=gen)
        else:
            labels = ids.clone()
            labels[:, : seq - response] = -100
        self.rows = [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
                     for i in range(n)]  # fmt: skip
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch)

    def batches(self, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        loader = DataLoader(self.rows, batch_size=self.batch)
        out = []
        while len(out) < count:
            out.extend({k: v.to(device) for k, v in b.items()} for b in loader)
        return out[:count]


class StepClock(pl.Callback):
    """Wall time of the steps after the warm-up (synchronized at its two ends only)."""

    def __init__(self, bench: Bench, warmup: int, steps: int) -> None:
        self.bench, self.warmup, self.steps = bench, warmup, steps
        self.seconds = math.nan
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.bench.sync()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            self.bench.sync()
            self.seconds = (time.perf_counter() - self._start) / self.steps


def trainer(bench: Bench, callbacks: list, precision: str, rounds: int = 1, **settings: Any) -> pl.Trainer:
    return quiet_trainer(
        accelerator=bench.accelerator(),
        devices=1,
        max_epochs=rounds,
        precision=precision,
        callbacks=callbacks,
        limit_val_batches=0,
        **settings,
    )


def count_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> float:
    """FLOPs of one forward + backward of ``model`` on ``batch`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode's SDPA formula refuses grouped KV heads; eager attention does the same products as
    # batched matmuls it counts (the KV heads repeated), so the count is taken there and SDPA put back.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = base.config._attn_implementation
    base.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    ctx = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with counter, ctx:
            model(**batch).loss.backward()
    finally:
        base.set_attn_implementation(kind)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bare_loop(
    bench: Bench, model: torch.nn.Module, batches: list, autocast: bool, lr: float, allocator: Any = None
) -> tuple[float, list[float]]:
    """The loop one writes by hand: AdamW over the trainable parameters, the same batches; s/step, losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    device = bench.device.type
    losses = []
    start = 0.0
    for i, batch in enumerate(batches):
        if i == bench.warmup:
            bench.sync()
            start = time.perf_counter()
        ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = model(**batch).loss
        loss.backward()
        if allocator is not None:
            allocator.update_ipt(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    bench.sync()
    return (time.perf_counter() - start) / bench.steps, [float(x) for x in losses]


# -- sections ----------------------------------------------------------------------------------------------
def section_ceiling(bench: Bench) -> dict:
    n = 256 if bench.tiny else 8192
    a = torch.randn(n, n, device=bench.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=bench.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    bench.sync()
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    bench.sync()
    rate = 2 * n**3 * reps / (time.perf_counter() - start)
    print(f"  bf16 {n}^3 matmul: {rate / 1e12:.0f} TFLOP/s (random data, mean of {reps} after 3 warm-ups)")
    return {"matmul_tflops": rate / 1e12, "n": n}


_LOAD_CHILD = r"""
import json, os, resource, sys, time, psutil, torch
sys.path.insert(0, sys.argv[3])
from lightning_fedpeft import FedPEFTModule
import peft, transformers  # imported before the baseline: their import is not the load
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama
if torch.cuda.is_available(): torch.zeros(1, device="cuda")  # the CUDA context, before the baseline
import threading
proc = psutil.Process()
before = proc.memory_info().rss
peak = [before]
done = threading.Event()
def sample():  # the RSS during the load only, every 2 ms (ru_maxrss would also count the imports' peak)
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
start = time.perf_counter()
module = FedPEFTModule(sys.argv[1], task="causal_lm", method="lora", base_dtype="bfloat16", **json.loads(sys.argv[2]))
if torch.cuda.is_available(): torch.cuda.synchronize()
seconds = time.perf_counter() - start
done.set(); watcher.join()
after = proc.memory_info().rss
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
device = str(next(module.parameters()).device)
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_peak": max(peak[0], after), "rss_after": after,
                  "ru_maxrss": maxrss, "device": device}))
"""


def section_load(bench: Bench) -> dict:
    folder = decoder_folder(bench, "llama1b")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, str(folder), "{}", str(Path(__file__).resolve().parents[1])],
        capture_output=True, text=True, timeout=max(30, bench.left()),
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    grew = got["rss_peak"] - got["rss_before"]
    row = {
        "seconds": got["seconds"],
        "bf16_weights_gb": weights / 1e9,
        "host_ram_during_load_gb": grew / 1e9,
        "host_ram_over_weights": grew / weights,
        "peak_rss_gb": got["rss_peak"] / 1e9,
        "rss_before_gb": got["rss_before"] / 1e9,
        "rss_after_gb": got["rss_after"] / 1e9,
        "ru_maxrss_gb": got["ru_maxrss"] / 1e9,
        "device": got["device"],
    }
    print(
        f"  1B load: {row['seconds']:.1f} s to {row['device']}, host RAM +{row['host_ram_during_load_gb']:.2f} GB "
        f"for {row['bf16_weights_gb']:.2f} GB of bf16 weights ({row['host_ram_over_weights']:.2f}x; goal <= 1.2x)"
    )
    return row


def _step_module(bench: Bench, folder: Path, method: str, **settings: Any) -> FedPEFTModule:
    torch.manual_seed(0)
    return FedPEFTModule(
        str(folder), task="causal_lm", method=method, rank=8, lora_alpha=16, lr=1e-4,
        base_dtype="bfloat16", max_new_tokens=0, **settings,
    )  # fmt: skip


def one_recipe(bench: Bench, name: str, method: str, precision: str, flops: dict, **settings: Any) -> dict:
    folder = decoder_folder(bench, "llama1b")
    vocab = bench.shapes["llama1b"]["vocab_size"]
    data = FixedRows(64, bench.seq, bench.response, vocab, bench.batch)
    module = _step_module(bench, folder, method, **settings)
    total = bench.warmup + bench.steps
    clock = StepClock(bench, bench.warmup, bench.steps)
    callbacks: list = [RoundSync(clients_per_round=1, num_clients=1, local_steps=total, seed=0), clock]
    if method == "svd":
        callbacks += [RankAllocation(target_rank=4, total_rounds=4, warmup_rounds=0), ModulePruning()]
    bench.reset_memory()
    trainer(bench, callbacks, precision).fit(module, datamodule=data)
    ours_peak = bench.peak_gb()
    # The bare loop on the same model (bf16-true left it in bf16), fresh AdamW, the same rows.
    model = module.model.to(bench.device)
    batches = data.batches(total, bench.device)
    allocator = None
    if method == "svd":  # peft's own recipe: its per-factor penalty (in its forward) and its allocator
        from peft.tuners.adalora.layer import RankAllocator

        allocator = RankAllocator(model, model.peft_config["default"], "default")
    autocast = precision == "bf16-mixed"
    bench.reset_memory()
    bare_s, _ = bare_loop(bench, model, batches, autocast, lr=1e-4, allocator=allocator)
    bare_peak = bench.peak_gb()
    if method not in flops:
        flops[method] = count_flops(model, batches[0], autocast)
    step_flops = flops[method]
    tokens = bench.batch * bench.seq
    row = {
        "recipe": name,
        "ms_per_step": clock.seconds * 1e3,
        "bare_ms_per_step": bare_s * 1e3,
        "ours_over_bare": clock.seconds / bare_s,
        "tokens_per_s": tokens / clock.seconds,
        "tflop_per_step": step_flops / 1e12,
        "mfu": step_flops / clock.seconds / PEAK_BF16,
        "peak_gpu_gb": ours_peak,
        "bare_peak_gpu_gb": bare_peak,
    }
    del module, model
    bench.reset_memory()
    print(
        f"  {name:<22} {row['ms_per_step']:8.1f} ms/step  {row['tokens_per_s']:9.0f} tok/s  "
        f"MFU {row['mfu'] * 100:5.1f}%  ours/bare {row['ours_over_bare']:.3f}  peak "
        f"{(ours_peak or 0):.1f} GB",
        flush=True,
    )
    return row


def fused_loss_check(bench: Bench) -> dict:
    """liger's fused kernels against the unfused model: the same weights and batch, the loss's relative gap."""
    folder = decoder_folder(bench, "llama1b")
    data = FixedRows(8, bench.seq, bench.response, bench.shapes["llama1b"]["vocab_size"], bench.batch)
    batch = data.batches(1, bench.device)[0]
    losses = []
    for fused in (False, True):
        module = _step_module(bench, folder, "lora", fused_kernels=fused).to(bench.device)
        with torch.no_grad(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
            losses.append(float(module.model(**batch).loss))
        del module
    gap = abs(losses[1] - losses[0]) / abs(losses[0])
    print(f"  fused loss {losses[1]:.5f} vs unfused {losses[0]:.5f}: relative gap {gap:.2e} (tolerance 1e-2, bf16)")
    return {"unfused": losses[0], "fused": losses[1], "relative_gap": gap, "within_1e-2": gap <= 1e-2}


def section_step(bench: Bench) -> dict:
    flops: dict[str, float] = {}  # per method, from the unfused model (FlopCounterMode does not see Triton kernels)
    rows = [one_recipe(bench, "LoRA bf16-mixed", "lora", "bf16-mixed", flops)]
    rows.append(one_recipe(bench, "LoRA bf16-true", "lora", "bf16-true", flops))
    rows.append(one_recipe(bench, "FedARA bf16-mixed", "svd", "bf16-mixed", flops))
    out: dict[str, Any] = {"fedara_over_lora": rows[2]["ms_per_step"] / rows[0]["ms_per_step"]}
    fused: dict = {"skipped": "no CUDA (liger-kernel runs Triton kernels)"}
    if bench.cuda:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            fused = {"skipped": "liger-kernel is not installed"}
        else:  # last: liger patches the Llama classes for the rest of the process
            fused = fused_loss_check(bench)
            rows.append(one_recipe(bench, "LoRA bf16-mixed fused", "lora", "bf16-mixed", flops, fused_kernels=True))
            rows.append(one_recipe(bench, "FedARA bf16-mixed fused", "svd", "bf16-mixed", flops, fused_kernels=True))
            out["fedara_over_lora_fused"] = rows[4]["ms_per_step"] / rows[3]["ms_per_step"]
    print("  FedARA / LoRA step: " + ", ".join(f"{k} {v:.2f}x" for k, v in out.items()) + " (goal <= 1.5x)")
    return {"rows": rows, "fused_check": fused, **out}


def section_qlora8b(bench: Bench) -> dict:
    import psutil

    folder = decoder_folder(bench, "llama8b")
    proc = psutil.Process()
    before = proc.memory_info().rss
    bench.reset_memory()
    baseline = torch.cuda.memory_allocated() / 2**30 if bench.cuda else None  # left by earlier sections
    start = time.perf_counter()
    torch.manual_seed(0)
    module = FedPEFTModule(
        str(folder), task="causal_lm", method="lora", rank=16, lora_alpha=32, lr=1e-4, base_dtype="bfloat16",
        quantization="nf4", gradient_checkpointing=True, max_new_tokens=0,
    )  # fmt: skip
    bench.sync()
    load_s = time.perf_counter() - start
    rss_grew = proc.memory_info().rss - before
    load_peak = bench.peak_gb()
    data = FixedRows(32, bench.seq, bench.response, bench.shapes["llama8b"]["vocab_size"], bench.batch)
    sync = RoundSync(clients_per_round=2, num_clients=2, local_steps=5, seed=0)
    bench.reset_memory()
    trainer(bench, [sync], "bf16-mixed").fit(module, datamodule=data)
    row = {
        "load_s": load_s,
        "host_ram_during_load_gb": rss_grew / 1e9,
        "load_peak_gpu_gb": load_peak,
        "gpu_gb_before": baseline,
        "round_s": sync.history[0]["round_time_s"],
        "s_per_step": sync.history[0]["round_time_s"] / 10,
        "peak_gpu_gb": bench.peak_gb(),
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if bench.cuda else None,
        "train_loss": sync.history[0]["train_loss"],
        "mb_up": sync.history[0]["bytes_up"] / 1e6,
    }
    print(
        f"  8B NF4 LoRA r16: load {load_s:.0f} s (host +{row['host_ram_during_load_gb']:.1f} GB), round of 2 x 5 "
        f"steps {row['round_s']:.1f} s, peak GPU {(row['peak_gpu_gb'] or 0):.1f} GB (goal <= 20), "
        f"{row['mb_up']:.0f} MB up"
    )
    del module
    bench.reset_memory()
    return row


def instruction_data(bench: Bench, rows: int = 400) -> Path:
    """A JSONL of instruction pairs in the word-level tokenizer's words (an intent-like task)."""
    gen = torch.Generator().manual_seed(0)
    path = bench.work / "instructions.jsonl"
    vocab = 200
    with path.open("w") as f:
        for _ in range(rows):
            words = torch.randint(10, vocab, (int(torch.randint(6, 40, (1,), generator=gen)),), generator=gen)
            label = int(words[:3].sum()) % 20  # learnable from the prompt
            prompt = " ".join(f"w{int(w)}" for w in words)
            f.write(json.dumps({"prompt": prompt, "response": f"w{300 + label}"}) + "\n")
    return path


def small_decoder(bench: Bench) -> Path:
    if "small" in bench.folders:
        return bench.folders["small"]
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = bench.shapes["llama1b"] if bench.tiny else dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=512, tie_word_embeddings=True,
    )  # fmt: skip
    config = LlamaConfig(**shape, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    folder = bench.work / "small"
    LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer(folder, config.vocab_size)
    bench.folders["small"] = folder
    return folder


def section_ranks(bench: Bench) -> dict:
    folder = small_decoder(bench)
    data = instruction_data(bench)
    rounds = 3
    common = [
        "fit", f"--model.model_name_or_path={folder}", "--model.task=causal_lm", "--model.method=lora",
        "--model.rank=8", "--model.max_new_tokens=0", f"--data.train_file={data}", "--data.corpus=null",
        "--data.num_clients=8", "--data.partitioner=iid", "--data.batch_size=8", "--data.max_length=64",
        "--data.max_val_examples=32", "--data.max_test_examples=32", f"--data.cache_dir={bench.work / 'cache'}",
        "--federation.clients_per_round=4", "--federation.local_steps=8", f"--trainer.max_epochs={rounds}",
        f"--trainer.accelerator={bench.accelerator()}", "--trainer.enable_progress_bar=false", "--test_after_fit=false",
        "--federation.eval_every=10",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1")
    env["OMP_NUM_THREADS"] = "1" if bench.tiny else env.get("OMP_NUM_THREADS", "4")
    out: dict[str, Any] = {}
    for label, launcher in (
        ("1 process", [sys.executable, "-m", "lightning_fedpeft"]),
        ("2 ranks", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                     "-m", "lightning_fedpeft"]),
    ):  # fmt: skip
        save_dir = bench.work / f"runs-{label.replace(' ', '')}"
        start = time.perf_counter()
        proc = subprocess.run(
            [*launcher, *common, f"--trainer.logger.init_args.save_dir={save_dir}"],
            env=env, capture_output=True, text=True, timeout=max(30, bench.left()),
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"{label}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
        import csv

        rows = list(csv.DictReader(next(save_dir.rglob("rounds.csv")).open()))
        out[label] = {
            "wall_s": time.perf_counter() - start,
            "s_per_round": statistics.median(float(r["round_time_s"]) for r in rows[1:]),
            "losses": [float(r["train_loss"]) for r in rows],
        }
    one, two = out["1 process"], out["2 ranks"]
    gap = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"], strict=True))
    out["speedup"] = one["s_per_round"] / two["s_per_round"]
    out["loss_relative_gap"] = gap
    print(
        f"  rounds 2-{rounds}: 1 process {one['s_per_round']:.2f} s/round, 2 ranks {two['s_per_round']:.2f} "
        f"({out['speedup']:.2f}x); losses agree to {gap:.1e} relative"
    )
    return out


def section_equivalence(bench: Bench) -> dict:
    from lightning_fedpeft import FederatedTextDataModule

    folder = small_decoder(bench)
    data_file = instruction_data(bench)

    def run(accelerator: str, precision: str) -> list[float]:
        data = FederatedTextDataModule(
            task="causal_lm", corpus=None, train_file=str(data_file), tokenizer=str(folder), num_clients=6,
            partitioner="iid", batch_size=8, max_length=64, max_val_examples=16, max_test_examples=16,
            cache_dir=str(bench.work / "cache"),
        )  # fmt: skip
        torch.manual_seed(0)
        module = FedPEFTModule(str(folder), task="causal_lm", method="lora", rank=8, lr=1e-3, max_new_tokens=0)
        sync = RoundSync(clients_per_round=2, local_steps=4, seed=0)
        t = pl.Trainer(
            accelerator=accelerator, devices=1, precision=precision, max_epochs=3, callbacks=[sync],
            limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        t.fit(module, datamodule=data)
        return [float(r["train_loss"]) for r in sync.history]

    cpu = run("cpu", "32-true")
    if not bench.cuda:
        return {"skipped": "no CUDA: the CPU run alone ran (the dry run)", "cpu_losses": cpu}
    gpu32 = run("gpu", "32-true")
    gpu16 = run("gpu", "bf16-mixed")  # 'auto' base in Python: loaded float32, cast to bf16 at setup
    fp32_gap = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu32, strict=True))
    bf16_gap = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu16, strict=True))
    row = {
        "cpu": cpu, "gpu_fp32": gpu32, "gpu_bf16_mixed": gpu16, "fp32_relative_gap": fp32_gap,
        "fp32_within_1e-5": fp32_gap <= 1e-5, "bf16_relative_gap": bf16_gap, "bf16_within_2e-2": bf16_gap <= 2e-2,
    }  # fmt: skip
    print(
        f"  3 rounds CPU vs GPU: fp32 {fp32_gap:.1e} relative (<= 1e-5: {row['fp32_within_1e-5']}), "
        f"bf16-mixed {bf16_gap:.1e} (<= 2e-2: {row['bf16_within_2e-2']})"
    )
    return row


def section_minilm(bench: Bench) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    folder = bench.work / "minilm"
    config = BertConfig(**bench.shapes["minilm"], num_labels=20)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    batch, seq = (2, 16) if bench.tiny else (32, 128)
    data = FixedRows(128, seq, 0, config.vocab_size, batch, classes=20)
    torch.manual_seed(0)
    module = FedPEFTModule(str(folder), num_labels=20, method="adapter", width=32, activation_cache_mb=None)
    total = bench.warmup + bench.steps
    clock = StepClock(bench, bench.warmup, bench.steps)
    sync = RoundSync(clients_per_round=1, num_clients=1, local_steps=total, seed=0)
    trainer(bench, [sync, clock], "32-true").fit(module, datamodule=data)
    bare_s, _ = bare_loop(bench, module.model.to(bench.device), data.batches(total, bench.device), False, 1e-3)
    row = {
        "ms_per_step": clock.seconds * 1e3,
        "bare_ms_per_step": bare_s * 1e3,
        "ours_over_bare": clock.seconds / bare_s,
    }
    print(
        f"  MiniLM adapters fp32 {batch}x{seq}: {row['ms_per_step']:.1f} ms/step, ours/bare {row['ours_over_bare']:.3f}"
    )
    return row


def section_deepspeed(bench: Bench) -> dict:
    if not bench.cuda:
        return {"skipped": "no CUDA: Lightning's DeepSpeed strategy runs on CUDA GPUs only"}
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "deepspeed is not installed on this machine"}
    from lightning.pytorch.strategies import DeepSpeedStrategy

    folder = decoder_folder(bench, "llama1b")
    data = FixedRows(64, bench.seq, bench.response, bench.shapes["llama1b"]["vocab_size"], bench.batch)
    from lightning_fedpeft.state import host_trainable_state

    out: dict[str, Any] = {}
    moved = {}
    for label, strategy in (("none", "auto"), ("zero2", DeepSpeedStrategy(stage=2))):
        module = _step_module(bench, folder, "lora")
        start = host_trainable_state(module)
        sync = RoundSync(clients_per_round=2, num_clients=2, local_steps=bench.warmup + bench.steps, seed=0)
        bench.reset_memory()
        trainer(bench, [sync], "bf16-mixed", rounds=2, strategy=strategy).fit(module, datamodule=data)
        end = host_trainable_state(module)
        moved[label] = torch.cat([(end[k] - start[k]).flatten() for k in sorted(start)])
        out[label] = {"round_s": sync.history[-1]["round_time_s"], "peak_gpu_gb": bench.peak_gb(),
                      "losses": [r["train_loss"] for r in sync.history]}  # fmt: skip
        del module
    # Where ZeRO's master weights did not follow each client's state, the clients of a round would train on
    # from each other's weights and the global model would move by a different amount: compare the moves.
    out["move_relative_gap"] = float((moved["zero2"] - moved["none"]).norm() / moved["none"].norm())
    print(
        f"  DeepSpeed ZeRO-2: round {out['zero2']['round_s']:.2f} s, peak {out['zero2']['peak_gpu_gb']:.1f} GB; "
        f"none: {out['none']['round_s']:.2f} s, {out['none']['peak_gpu_gb']:.1f} GB; losses {out['zero2']['losses']} "
        f"vs {out['none']['losses']}; global move differs by {out['move_relative_gap']:.2e} relative"
    )
    return out


SECTIONS = {
    "ceiling": section_ceiling,
    "load": section_load,
    "step": section_step,
    "qlora8b": section_qlora8b,
    "equivalence": section_equivalence,
    "ranks": section_ranks,
    "minilm": section_minilm,
    "deepspeed": section_deepspeed,
}
# Rough seconds each needs on an H200 (not started with less left, so the run ends inside its budget).
NEEDS = {"ceiling": 5, "equivalence": 40, "load": 40, "step": 120, "qlora8b": 150, "ranks": 90, "minilm": 20,
         "deepspeed": 60}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes on whatever device is there: a dry run")
    parser.add_argument("--cpu", action="store_true", help="ignore a GPU")
    parser.add_argument("--out", default="bench/out/gpu.json", help="the JSON of every figure")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in this order")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench = Bench(args)
    print(f"bench/gpu.py on {bench.results['machine']} (torch {torch.__version__}){' --tiny' if bench.tiny else ''}")
    try:
        for name in args.sections.split(","):
            if name not in SECTIONS:
                raise SystemExit(f"--sections: unknown section {name!r}; known: {', '.join(SECTIONS)}")
            if not bench.tiny and bench.left() < NEEDS[name]:
                bench.results[name] = {"skipped": f"time budget: {bench.left():.0f} s left, needs about {NEEDS[name]}"}
                print(f"[{name}] skipped: time budget")
                continue
            print(f"[{name}]", flush=True)
            start = time.perf_counter()
            try:
                bench.results[name] = SECTIONS[name](bench)
            except Exception as err:  # one section's failure is a result too; the others go on
                traceback.print_exc()
                bench.results[name] = {"failed": f"{type(err).__name__}: {str(err)[:1500]}"}
            bench.results.setdefault("seconds", {})[name] = time.perf_counter() - start
            write(args.out, bench.results)
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    write(args.out, bench.results)
    print_table(bench.results)
    print(f"peak host RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


def write(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1, default=str))


def print_table(results: dict) -> None:
    print(f"\nsummary ({results['machine']}, {results['date']}{', tiny' if results['tiny'] else ''})")
    step = results.get("step", {})
    if "rows" in step:
        print(f"{'recipe (8x512)':<26}{'ms/step':>9}{'tok/s':>9}{'MFU':>7}{'ours/bare':>10}{'peak GB':>9}")
        for r in step["rows"]:
            print(
                f"{r['recipe']:<26}{r['ms_per_step']:>9.1f}{r['tokens_per_s']:>9.0f}{r['mfu'] * 100:>6.1f}%"
                f"{r['ours_over_bare']:>10.3f}{(r['peak_gpu_gb'] or 0):>9.1f}"
            )
        print(f"FedARA / LoRA: {step['fedara_over_lora']:.2f}x (fused: {step.get('fedara_over_lora_fused', 'n/a')})")
    for name in SECTIONS:
        value = results.get(name)
        if name == "step" and value and "rows" in value:
            continue
        brief = {k: v for k, v in (value or {}).items() if not isinstance(v, list | dict)}
        print(f"{name}: {json.dumps(brief, default=str)[:400]}")


if __name__ == "__main__":
    main()
