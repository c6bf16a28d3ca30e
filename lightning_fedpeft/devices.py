"""Which device a client process trains on, and in which precision: checked before any training.

Every process is one client process on one device (RoundSync swaps trainable states per client; it does
not run Lightning's DDP). Whatever the device, what leaves the process is on the CPU
(:func:`lightning_fedpeft.state.to_host`): the server keeps and aggregates the global state on its CPU
in float64 (states are megabytes; a GPU's memory is for the clients' training), and TensorPipe is set up
for CPU tensors only.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_fedpeft.launchers.env import distributed_env
from lightning_fedpeft.loading import rank_gpu


def rank_devices(devices: Any = "auto", accelerator: Any = "auto") -> Any:
    """The ``Trainer(devices=...)`` for this process when it is one rank of several (else ``devices``).

    Every rank is one client process on one device. Left to itself, Lightning under torchrun would take
    every GPU of the node in every rank and start DDP. With GPUs and ``devices`` left at ``auto``, a rank
    trains on GPU ``LOCAL_RANK`` (modulo the GPUs there are, so several ranks may share one); a single
    device the user names (``[2]``, ``1``) is kept; more than one is refused.
    """
    if distributed_env() is None:
        return devices
    if _device_count(devices) > 1:
        raise ValueError(
            f"trainer.devices={devices!r}: under torchrun every rank is one client on one device; leave "
            f"trainer.devices at auto (each rank takes GPU LOCAL_RANK) or name one device per rank, e.g. [0]"
        )
    wants_gpu = str(accelerator) in ("auto", "gpu", "cuda")
    if devices in ("auto", None) and wants_gpu and torch.cuda.is_available():
        return [rank_gpu().index]
    return devices


def _device_count(devices: Any) -> int:
    # Lightning's spellings: 2, -1 (all), "2", "0,1", [0, 1]; "auto" and None count as one here.
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", ""):
            return 1
        devices = [d for d in text.split(",") if d.strip()] if "," in text else int(text)
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, int):
        return 2 if devices == -1 else devices  # -1: every device of the node
    return 1


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` naming ``trainer.precision`` if ``device`` cannot train in it.

    Lightning accepts every precision on every accelerator at construction; a GPU without bfloat16
    (before Ampere, e.g. a Jetson TX2 or a T4) fails only at its first step, deep in a kernel.
    """
    if "bf16" in precision and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"trainer.precision={precision!r}: {name} has no bfloat16; use '16-mixed' (float16 autocast) or '32-true'"
        )
