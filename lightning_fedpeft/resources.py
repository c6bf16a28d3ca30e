"""ClientResources: what a client's local round costs on this machine: step time and memory."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedpeft.algorithm import ClientContext, ClientResult, FederatedAlgorithm


class ClientResources(FederatedAlgorithm):
    """Measures every client's local training and adds, per round (mean over its clients), to ``rounds.csv``:

    * ``step_time_ms``: the median wall time of one local step (forward, backward, optimizer);
    * ``peak_rss_mb``: the process's peak resident memory while the client trained. On Linux the kernel's
      peak counter is reset at each client's start (``/proc/self/clear_refs``); elsewhere it is the
      process's peak so far, which can only rise;
    * ``saved_activation_mb``: the largest amount of tensor storage autograd keeps for the backward pass in
      one step (counted once per storage, through ``torch.autograd.graph.saved_tensors_hooks``). Unlike the
      RSS it does not depend on the allocator, so it shows plainly what a smaller trainable part saves.

    A client-only algorithm: add it beside :class:`~lightning_fedpeft.RoundSync`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._steps: list[float] = []
        self._t0 = 0.0
        self._saved: dict[int, int] = {}
        self._saved_peak = 0
        self._hooks: Any = None

    # -- the client half ---------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext, pl_module: pl.LightningModule) -> None:
        self._steps = []
        self._saved_peak = 0
        reset_peak_rss()

    def on_client_end(self, ctx: ClientContext, pl_module: pl.LightningModule) -> ClientResult:
        metrics = {"saved_activation_mb": self._saved_peak / 2**20}
        if self._steps:
            metrics["step_time_ms"] = 1000.0 * statistics.median(self._steps)
        rss = peak_rss_mb()
        if rss is not None:
            metrics["peak_rss_mb"] = rss
        return ClientResult(metrics=metrics)

    # -- Lightning hooks: time each step, count what autograd saves --------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._t0 = time.perf_counter()
        self._saved = {}

        def pack_hook(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            self._saved[storage.data_ptr()] = storage.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t)
        self._hooks.__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._close_hooks()
        self._saved_peak = max(self._saved_peak, sum(self._saved.values()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._close_hooks()
        self._steps.append(time.perf_counter() - self._t0)

    def _close_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs``); return whether it worked.

    First hands the C heap's free pages back to the kernel (glibc ``malloc_trim``): freed tensors otherwise
    stay resident, so the counter would restart from the largest footprint of any earlier client and could
    never show a client that needs less.
    """
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Return free C-heap memory to the kernel (glibc's ``malloc_trim(0)``); ``False`` where there is none.

    Hand-written through ctypes: neither torch nor psutil exposes it, and it is one call.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False


def peak_rss_mb() -> float | None:
    """The process's peak resident memory in MiB (``VmHWM``, else ``ru_maxrss``), or ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None
