"""A fresh optimizer per client under Lightning's DeepSpeed strategy (ZeRO stages 1 and 2).

RoundSync gives every client a fresh optimizer by asking the strategy to build one again. DeepSpeed's
strategy builds its optimizer once, inside the engine, and its ``setup_optimizers`` only empties the list,
so there the reset is done on the engine's optimizer instead: the ZeRO optimizer's float32 master copy of
the trainable parameters is refreshed from the module (which just received the client's state; without
this, the next step would write the previous client's weights back), and the inner optimizer's moments
are dropped (torch's and DeepSpeed's Adam rebuild them at the next step, as for a new optimizer).

ZeRO stage 3 partitions the parameters themselves, so the in-place state swap cannot see them: it is
refused when fit sets up. Found on a GPU (bench/gpu.py): Lightning's strategy asks the data for its batch
size before the first round is open; RoundSync tells it instead (:func:`prepare_deepspeed`).
"""

from __future__ import annotations

from typing import Any


def deepspeed_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (0 without ZeRO), ``None`` for any other strategy."""
    if type(strategy).__name__ != "DeepSpeedStrategy":
        return None
    config = getattr(strategy, "config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def prepare_deepspeed(strategy: Any, batch_size: int) -> None:
    """Refuse ZeRO stage 3, naming the setting (see the module); tell DeepSpeed the local batch size.

    Lightning's strategy otherwise asks the training loader for it while it sets up, before the first round
    is open (the loader is the round's: there is none yet). DeepSpeed uses it for its throughput logs only.
    """
    stage = deepspeed_stage(strategy)
    if stage is None:
        return
    if isinstance(getattr(strategy, "config", None), dict):
        strategy.config.setdefault("train_micro_batch_size_per_gpu", batch_size)
    if stage == 3:
        raise ValueError(
            "trainer.strategy: DeepSpeed ZeRO stage 3 partitions the parameters that RoundSync swaps per client; "
            "use stage 2 (deepspeed_stage_2, or deepspeed_stage_2_offload for a client whose optimizer state "
            "does not fit its GPU)"
        )


def reset_zero_optimizer(strategy: Any) -> None:
    """Make the engine's optimizer as fresh as a new one for the parameters the module holds now."""
    optimizer = getattr(getattr(strategy, "deepspeed_engine", None), "optimizer", None)
    if optimizer is None:  # not set up yet: the engine's first optimizer is fresh
        return
    restore = getattr(optimizer, "_restore_from_bit16_weights", None)
    if callable(restore):  # ZeRO 1/2: float32 partitions <- the module's parameters
        restore()
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()
