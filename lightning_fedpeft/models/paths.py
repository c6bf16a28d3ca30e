"""Where a model lives: an alias of a packaged model or a local folder, checked for a config and weights, and
whether it is the kind of model the task needs. Nothing is ever downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_fedpeft.models.architectures import TASKS
from lightning_fedpeft.packaged import PACKAGED_MODELS

_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def resolve_model_path(name_or_path: str) -> Path:
    """Turn an alias (``minilm``) or a folder into a folder that holds a config and weights.

    Raises ``ValueError`` naming ``model.model_name_or_path`` when the folder or its weights are missing.
    """
    if name_or_path in PACKAGED_MODELS:
        path = PACKAGED_MODELS[name_or_path].folder()
    else:
        path = Path(os.path.expanduser(name_or_path))
    if not path.is_dir():
        raise ValueError(
            f"model_name_or_path={name_or_path!r} is not a folder; give a local Hugging Face model folder "
            f"or one of the packaged models {sorted(PACKAGED_MODELS)} (nothing is downloaded from a hub)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model_name_or_path={name_or_path!r}: {path} has no config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(
            f"model_name_or_path={name_or_path!r}: {path} has no weights (looked for {', '.join(_WEIGHT_FILES)})"
        )
    return path


def check_task(path: Path, task: str) -> None:
    """Refuse a folder whose model is a decoder for classification, or not one for ``causal_lm``.

    Read off ``config.json``'s ``architectures`` (``...ForCausalLM`` / ``...LMHeadModel`` are decoders); a
    config that names none is taken at its word.
    """
    if task not in TASKS:
        raise ValueError(f"model.task={task!r} is unknown; allowed: {', '.join(TASKS)}")
    import json

    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    decoder = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures)
    if architectures and task == "causal_lm" and not decoder:
        raise ValueError(
            f"model.task='causal_lm' needs a decoder, but {path} holds {architectures[0]}; give a causal LM "
            f"folder (e.g. model_name_or_path=smollm2) or set model.task='classification'"
        )
    if architectures and task == "classification" and decoder:
        raise ValueError(
            f"model.task='classification' trains an encoder classifier, but {path} holds the decoder "
            f"{architectures[0]}; set model.task='causal_lm' to tune it on instructions"
        )
