"""Wrapping a loaded model with a parameter-efficient method, described by one checked :class:`PEFTConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lightning_fedpeft.models.architectures import FFN_OUTPUT, PEFT_METHODS, PEFTMethod, default_targets
from lightning_fedpeft.tuners.adapter import AdapterConfig, find_transformer_layers, inject_adapters


@dataclass
class PEFTConfig:
    """Which parameter-efficient method wraps the model, and its settings (checked when built).

    ``FedPEFTModule`` takes these as its flat ``model.*`` settings (the CLI's and every config's names)
    and builds one of these from them; :func:`apply_peft` takes it. Settings another method does not read
    are not checked for it (``rank`` under ``adapter``).

    Args:
        method: ``adapter`` | ``lora`` | ``svd`` | ``full`` | ``freeze``.
        depth: adapters: how many top layers get one; freeze: how many top layers train (``None``: all).
        width: adapters: the bottleneck size.
        rank: lora/svd: the rank of each adapted matrix.
        lora_alpha: lora/svd: the scaling numerator (``lora_alpha / rank``).
        lora_dropout: lora/svd: dropout on the low-rank path, in [0, 1).
        target_modules: lora/svd: module-name suffixes to adapt (``None``: the architecture's defaults).
        orth_reg_weight: svd: the weight of AdaLoRA's orthogonality penalty.
    """

    method: PEFTMethod = "adapter"
    depth: int | None = None
    width: int = 32
    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ValueError(
                f"model.method={self.method!r} is not a known PEFT method; allowed: {', '.join(PEFT_METHODS)}"
            )
        if self.method in ("lora", "svd"):
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"model.rank={self.rank!r} must be a positive integer")
            alpha = self.lora_alpha
            if isinstance(alpha, bool) or not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
                raise ValueError(f"model.lora_alpha={self.lora_alpha!r} must be positive (0 scales the update away)")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"model.lora_dropout={self.lora_dropout!r} must be within [0, 1)")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"model.orth_reg_weight={self.orth_reg_weight} must be >= 0")


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level names of the classification head (``classifier`` for BERT-likes, ``score`` for decoders)."""
    names = [n for n, _ in model.named_children() if n in ("classifier", "score")]
    if not names:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")
    return names


def _layer_linear_names(names: list[str]) -> list[str]:
    """The linear layers' names within a transformer layer (the part after the layer index)."""
    out: set[str] = set()
    for name in names:
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        if digits:
            out.add(".".join(parts[digits[-1] + 1 :]))
    return sorted(out)


def apply_peft(model: nn.Module, config: PEFTConfig, task: str = "classification") -> nn.Module:
    """Wrap ``model`` as ``config`` says and set ``requires_grad`` so that exactly the federated part trains.

    A classifier's head always trains. A decoder's tied input/output embedding never does (not even with
    ``full``): it is the largest tensor of a small LLM and would travel every round. Returns the model to
    train (peft returns a wrapper). ``depth=None`` (adapters, layer freezing) means every transformer layer.
    """
    method, depth, width = config.method, config.depth, config.width
    heads = head_module_names(model) if task == "classification" else []
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if task == "causal_lm":
            _freeze_tied_embeddings(model)
        return model
    if method in ("freeze", "adapter") and depth is None:
        depth = len(find_transformer_layers(model))  # every layer, so a cut model needs no setting
    if method == "freeze":  # layer freezing: the top `depth` transformer layers and the head train
        layers = find_transformer_layers(model)
        if not 0 <= depth <= len(layers):
            raise ValueError(f"depth={depth} is outside the model's layers: allowed 0..{len(layers)}")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - depth :]:
            layer.requires_grad_(True)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        return model
    if method == "adapter":
        for p in model.parameters():
            p.requires_grad_(False)
        model_type = getattr(getattr(model, "config", None), "model_type", "bert")
        ffn_output = FFN_OUTPUT.get(model_type, AdapterConfig.ffn_output)
        injection = inject_adapters(model, AdapterConfig(depth=depth, width=width, ffn_output=ffn_output))
        for adapter in injection.adapters.values():
            adapter.requires_grad_(True)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        model.adapter_injection = injection  # kept so later upgrades can find (and grow) the adapters
        return model

    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    targets = list(config.target_modules or default_targets(model, method))
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched} match no linear layer of {type(model).__name__}; set target_modules to "
            f"suffixes of its module names, e.g. {_layer_linear_names(linear_names)}"
        )
    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    rank, alpha, dropout = config.rank, config.lora_alpha, config.lora_dropout
    if method == "lora":
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=heads or None,
            task_type=task_type,
        )
    else:  # svd: peft's AdaLoRA layers (P, Lambda, Q) at a fixed rank; no allocation is ever called.
        peft_config = AdaLoraConfig(
            init_r=rank,
            target_r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=heads or None,
            orth_reg_weight=config.orth_reg_weight,
            task_type=task_type,  # AdaLoRA's model adds its orthogonality penalty to the loss in every task
            total_step=1,  # required by peft; unused because update_and_allocate is never called here
        )
    return get_peft_model(model, peft_config)


def _freeze_tied_embeddings(model: nn.Module) -> None:
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        embeddings.weight.requires_grad_(False)
