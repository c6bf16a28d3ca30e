"""The model side: architectures, where a model lives, loading, pooling and PEFT wrapping, one file each."""

from lightning_fedpeft.models.architectures import (
    ARCHITECTURE_TARGETS,
    DEFAULT_LORA_TARGETS,
    DEFAULT_SVD_TARGETS,
    FFN_OUTPUT,
    LLAMA_STYLE_TYPES,
    PEFT_METHODS,
    TASKS,
    PEFTMethod,
    Task,
    default_targets,
    max_input_tokens,
)
from lightning_fedpeft.models.loaders import load_backbone, load_causal_lm
from lightning_fedpeft.models.paths import check_task, resolve_model_path
from lightning_fedpeft.models.pooling import POOLINGS, MaskedMeanPooler, MeanPooledHead, use_mean_pooling
from lightning_fedpeft.models.wrapping import PEFTConfig, apply_peft, head_module_names

__all__ = [
    "ARCHITECTURE_TARGETS",
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_SVD_TARGETS",
    "FFN_OUTPUT",
    "LLAMA_STYLE_TYPES",
    "PEFT_METHODS",
    "POOLINGS",
    "TASKS",
    "MaskedMeanPooler",
    "MeanPooledHead",
    "PEFTConfig",
    "PEFTMethod",
    "Task",
    "apply_peft",
    "check_task",
    "default_targets",
    "head_module_names",
    "load_backbone",
    "load_causal_lm",
    "max_input_tokens",
    "resolve_model_path",
    "use_mean_pooling",
]
