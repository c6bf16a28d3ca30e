"""What the benches share: a Trainer that prints and saves nothing but what a bench measures."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(**settings: Any) -> pl.Trainer:
    """A Trainer without logger, checkpoints, progress bar, model summary or sanity check (each can be set)."""
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**(defaults | settings))
