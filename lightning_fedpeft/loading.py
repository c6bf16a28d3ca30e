"""How the frozen base model is loaded: its dtype, its quantization and its device, checked before any load.

A decoder of a few billion parameters loaded in float32 on the host, then moved and cast, needs four bytes
per parameter of host memory per rank before training starts (32 GB for an 8 B model). Here the base is
loaded in the precision it runs in, with the weights streamed from the files onto the rank's device
(transformers builds the model on the meta device first, so no float32 copy is ever made), and
optionally quantized to 4 or 8 bits on the way (QLoRA).

The trainable tensors (adapters, LoRA / SVD factors, a classifier's head) stay float32 whatever the base's
dtype: they are what the federation averages and sends (:mod:`lightning_fedpeft.state`).

Quantization goes through bitsandbytes, as transformers and peft integrate it: ``BitsAndBytesConfig`` at
load, and peft's LoRA and AdaLoRA (SVD) layers wrap its ``Linear4bit`` / ``Linear8bitLt`` layers. It is the
library every peer's QLoRA recipe uses (FlowerTune, NVIDIA FLARE), and since 0.49 it runs on the CPU too,
so the quantized path is tested here without a GPU. torchao's int4 weight-only tensors were the other
candidate; peft's LoRA does not wrap them for training, and their NF4 type is gone from torchao 0.18.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

BASE_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Methods that train the base's own weights cannot have a quantized (integer) base.
_TRAINS_BASE = ("full", "freeze")


@dataclass(frozen=True)
class BaseLoading:
    """The frozen base's load settings (``model.base_dtype``, ``model.quantization``, ``model.load_device``).

    Args:
        dtype: ``auto`` (see :func:`auto_dtype`: a half dtype when the trainer trains in one on a GPU,
            float32 otherwise), ``float32``, ``bfloat16`` or ``float16``. With quantization, the dtype of
            the layers that are not quantized and of the 4/8-bit matrix products.
        quantization: ``none``, ``nf4`` (4-bit NormalFloat with double quantization, QLoRA's) or ``int8``
            (LLM.int8()); needs ``pip install bitsandbytes``.
        device: ``auto`` (the rank's GPU when CUDA is there: ``cuda:LOCAL_RANK`` modulo the GPUs; else the
            CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in BASE_DTYPES:
            raise ValueError(f"model.base_dtype={self.dtype!r} is unknown; allowed: {', '.join(BASE_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"model.quantization={self.quantization!r} is unknown; allowed: {', '.join(QUANTIZATIONS)}"
            )
        device = str(self.device)
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"model.load_device={self.device!r} is unknown; allowed: auto, cpu, cuda, cuda:N")

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def target_device(self) -> torch.device:
        """Where the weights go (``auto``: the rank's GPU if CUDA is available, else the CPU)."""
        if self.device == "auto":
            return rank_gpu() if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)

    def load_target(self, precision: str | None = None) -> tuple[torch.device, torch.dtype]:
        """The device and dtype of the load. ``auto`` device: the rank's GPU (:meth:`target_device`) for a half
        or quantized base; a float32 base loads on the CPU as it always has (fresh weights, such as a new
        classifier head, are then drawn from the CPU's generator wherever the run trains), and Lightning
        moves it."""
        gpu = self.target_device()
        dtype = self.torch_dtype(gpu, precision)
        if self.device == "auto" and dtype == torch.float32 and not self.quantized:
            return torch.device("cpu"), dtype
        return gpu, dtype

    def torch_dtype(self, device: torch.device, precision: str | None = None) -> torch.dtype:
        """The dtype the base is loaded in (``auto`` resolved for ``precision`` on ``device``)."""
        if self.dtype == "auto":
            return auto_dtype(precision, device)
        return _DTYPES[self.dtype]

    def check(self, method: str, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse, naming the setting, what ``device`` or ``method`` cannot do: before any weight is read."""
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"model.load_device={self.device!r}: CUDA is not available here; use auto or cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"model.load_device={self.device!r}: this node has {torch.cuda.device_count()} GPU(s)")
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                raise ValueError(
                    f"model.base_dtype={self.dtype!r}: {torch.cuda.get_device_name(device)} has no bfloat16; "
                    f"use float16 (with trainer.precision='16-mixed') or float32"
                )
        elif device.type != "cpu":
            raise ValueError(f"model.load_device={self.device!r}: only cpu and cuda devices are supported")
        if not self.quantized:
            return
        if method in _TRAINS_BASE:
            raise ValueError(
                f"model.quantization={self.quantization!r} freezes the base in {self.quantization}, but "
                f"model.method={method!r} trains the base's own weights; use lora, svd or adapter, or "
                f"model.quantization='none'"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                f"model.quantization={self.quantization!r} needs bitsandbytes: pip install -e '.[gpu]' "
                f"(or pip install bitsandbytes), or set model.quantization='none'"
            )

    def from_pretrained_kwargs(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
        """The keyword arguments of ``from_pretrained`` that load the base this way; ``None`` for float32 on the
        CPU, which loads as the package always has (the loaders' defaults)."""
        if (device.type, dtype, self.quantized) == ("cpu", torch.float32, False):
            return None
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device.type != "cpu" or self.quantized:  # streamed onto the device (accelerate's device map)
            kwargs["device_map"] = {"": str(device)}
        if self.quantized:
            from transformers import BitsAndBytesConfig

            if self.quantization == "nf4":
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype,
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        return kwargs


def rank_gpu() -> torch.device:
    """This rank's GPU: ``LOCAL_RANK`` (else ``RANK``, else 0) modulo the GPUs of the node, so several ranks may
    share one. Needs CUDA."""
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    return torch.device("cuda", local % torch.cuda.device_count())


def auto_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """``base_dtype: auto``: bfloat16 (float16 on a GPU without it) when the trainer's precision is a half
    one (``bf16-mixed``, ``bf16-true``, ``16-mixed``, ``16-true``) on a GPU; float32 on a CPU, under
    ``32-true`` or when the precision is not known yet."""
    text = str(precision or "")
    if device.type != "cuda" or not ("16" in text and "32" not in text and "64" not in text):
        return torch.float32
    if text.startswith("bf16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def check_precision_for_base(base_dtype: torch.dtype, precision: str) -> None:
    """Refuse a half-precision base under a full-precision trainer (no autocast mixes the dtypes)."""
    text = str(precision)
    if base_dtype in (torch.bfloat16, torch.float16) and not ("16" in text and "32" not in text):
        name = str(base_dtype).removeprefix("torch.")
        raise ValueError(
            f"model.base_dtype={name!r} under trainer.precision={text!r}: the frozen {name} base would meet "
            f"float32 trainable layers with no autocast between them; set trainer.precision to "
            f"'{'bf16' if base_dtype == torch.bfloat16 else '16'}-mixed' or model.base_dtype to auto / float32"
        )


def float32_trainables(model: torch.nn.Module) -> int:
    """Cast every trainable parameter that is not float32 (a head copied from a half base) to float32.

    Returns how many were cast. The federated state is float32 whatever the base's dtype.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def check_fused_kernels(task: str) -> None:
    """Refuse ``model.fused_kernels`` where liger-kernel cannot run, naming the setting (before any load)."""
    if task != "causal_lm":
        raise ValueError("model.fused_kernels: liger-kernel's kernels serve decoders (model.task='causal_lm') only")
    if not torch.cuda.is_available():
        raise ValueError("model.fused_kernels: liger-kernel's Triton kernels need a CUDA GPU; leave it false here")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("model.fused_kernels needs liger-kernel: pip install -e '.[gpu]', or leave it false")


def use_fused_kernels(model: torch.nn.Module) -> None:
    """Swap liger-kernel's fused kernels into a loaded decoder (before peft wraps it); refuse an
    architecture liger does not know."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.fused_kernels: liger-kernel has no kernels for model type {model_type!r}")
    _apply_liger_kernel_to_instance(model=model)
