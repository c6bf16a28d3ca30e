"""Loading a local Hugging Face model, a classifier or a decoder, optionally cut to its first layers.

``local_files_only=True`` everywhere, so a typo never turns into a hub request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_fedpeft.hf_logging import quiet_transformers
from lightning_fedpeft.models.pooling import POOLINGS, use_mean_pooling


def load_causal_lm(path: Path, num_hidden_layers: int | None = None, load_kwargs: dict | None = None) -> nn.Module:
    """Load a decoder (``AutoModelForCausalLM``) from a local folder, optionally cut to its first layers.

    ``load_kwargs`` go to ``from_pretrained`` (dtype, device map, quantization: see
    :meth:`~lightning_fedpeft.loading.BaseLoading.from_pretrained_kwargs`); default: float32 on the CPU.
    """
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, num_hidden_layers, {}, load_kwargs or {"dtype": torch.float32})


def load_backbone(
    path: Path,
    num_labels: int,
    num_hidden_layers: int | None = None,
    pooling: str = "model",
    load_kwargs: dict | None = None,
) -> nn.Module:
    """Load a sequence-classification model from a local folder, optionally cut to its first layers.

    ``pooling="mean"`` replaces a BERT-style pooler with
    :class:`~lightning_fedpeft.models.pooling.MaskedMeanPooler`. ``load_kwargs`` go to ``from_pretrained``,
    as for :func:`load_causal_lm`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling={pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, path, num_hidden_layers, {"num_labels": num_labels}, load_kwargs)
    return use_mean_pooling(model) if pooling == "mean" else model


def _load(
    auto_class: Any,
    path: Path,
    num_hidden_layers: int | None,
    config_kwargs: dict[str, Any],
    load_kwargs: dict[str, Any] | None,
) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, **config_kwargs)
    if num_hidden_layers is not None:
        if not 1 <= num_hidden_layers <= config.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers={num_hidden_layers} is outside 1..{config.num_hidden_layers} for {path}"
            )
        config.num_hidden_layers = num_hidden_layers
        if getattr(config, "layer_types", None):  # per-layer attention kinds (Gemma 3, Qwen 3) follow the cut
            config.layer_types = list(config.layer_types)[:num_hidden_layers]
    with quiet_transformers():
        return auto_class.from_pretrained(path, config=config, local_files_only=True, **(load_kwargs or {}))
