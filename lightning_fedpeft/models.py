"""Loading a local Hugging Face model (a classifier, or a decoder for causal LM) and wrapping it with a
parameter-efficient method.

Nothing here downloads: models come from local folders (or the packaged ones), with
``local_files_only=True`` so a typo never turns into a hub request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lightning_fedpeft.packaged import PACKAGED_MODELS
from lightning_fedpeft.tuners.adapter import AdapterConfig, find_transformer_layers, inject_adapters

PEFTMethod = Literal["adapter", "lora", "svd", "full", "freeze"]
PEFT_METHODS: tuple[str, ...] = ("adapter", "lora", "svd", "full", "freeze")
Task = Literal["classification", "causal_lm"]
TASKS: tuple[str, ...] = ("classification", "causal_lm")

# The six linear kinds of a BERT layer: attention query/key/value/output and the two feed-forward ones.
# peft matches target names as suffixes, so "output.dense" also covers "attention.output.dense".
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("query", "value")
DEFAULT_SVD_TARGETS: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# The same kinds under other architectures' module names, by ``config.model_type``. MPNet's attention
# output is ``attn.o``, so there "output.dense" matches the feed-forward output only.
# Decoders: the seven linear kinds of a Llama-style layer (attention and the gated feed-forward) for
# both methods, as FlowerTune and OpenFedLLM adapt them; GPT-2's three (its Conv1D layers).
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_GPT2 = ("c_attn", "c_proj", "c_fc")
ARCHITECTURE_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (DEFAULT_LORA_TARGETS, DEFAULT_SVD_TARGETS),
    "mpnet": (("attn.q", "attn.v"), ("attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense")),
    **{kind: (_LLAMA_STYLE, _LLAMA_STYLE) for kind in LLAMA_STYLE_TYPES},
    "gpt2": (_GPT2, _GPT2),
}
# Where a decoder layer's feed-forward output is (adapters go after it), by model type.
FFN_OUTPUT: dict[str, str] = {"gpt2": "mlp.c_proj"} | {kind: "mlp.down_proj" for kind in LLAMA_STYLE_TYPES}


def default_targets(model: nn.Module, method: str) -> tuple[str, ...]:
    """The default ``target_modules`` of ``method`` ("lora" or "svd") for ``model``'s architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", "bert")
    lora, svd = ARCHITECTURE_TARGETS.get(model_type, ARCHITECTURE_TARGETS["bert"])
    return lora if method == "lora" else svd


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


def load_causal_lm(path: Path, num_hidden_layers: int | None = None, load_kwargs: dict | None = None) -> nn.Module:
    """Load a decoder (``AutoModelForCausalLM``) from a local folder, optionally cut to its first layers.

    ``load_kwargs`` go to ``from_pretrained`` (dtype, device map, quantization: see
    :meth:`~lightning_fedpeft.loading.BaseLoading.from_pretrained_kwargs`); default: float32 on the CPU.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if num_hidden_layers is not None:
        if not 1 <= num_hidden_layers <= config.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers={num_hidden_layers} is outside 1..{config.num_hidden_layers} for {path}"
            )
        config.num_hidden_layers = num_hidden_layers
        if getattr(config, "layer_types", None):  # per-layer attention kinds (Gemma 3, Qwen 3) follow the cut
            config.layer_types = list(config.layer_types)[:num_hidden_layers]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        kwargs = load_kwargs or {"dtype": torch.float32}
        return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def load_backbone(
    path: Path,
    num_labels: int,
    num_hidden_layers: int | None = None,
    pooling: str = "model",
    load_kwargs: dict | None = None,
) -> nn.Module:
    """Load a sequence-classification model from a local folder, optionally cut to its first layers.

    ``pooling="mean"`` replaces a BERT-style pooler with :class:`MaskedMeanPooler`. ``load_kwargs`` go to
    ``from_pretrained``, as for :func:`load_causal_lm`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling={pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    if num_hidden_layers is not None:
        if not 1 <= num_hidden_layers <= config.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers={num_hidden_layers} is outside 1..{config.num_hidden_layers} for {path}"
            )
        config.num_hidden_layers = num_hidden_layers
    # transformers prints a load report listing the (expected) fresh classifier head and, with a cut
    # model, the unused upper layers; silence it so the run's own output stays readable.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, local_files_only=True, **(load_kwargs or {})
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return use_mean_pooling(model) if pooling == "mean" else model


POOLINGS: tuple[str, ...] = ("mean", "model")


def max_input_tokens(model: nn.Module) -> int | None:
    """How many tokens ``model``'s learned position table can read (``None``: no such table, e.g. RoPE).

    BERT-likes (``embeddings.position_embeddings``; RoBERTa and MPNet keep the slots up to their padding
    index) and GPT-2 (``wpe``) fail with a shape error on a longer input, mid-training.
    """
    base = getattr(model, "base_model", model)
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if table is None:
        table = getattr(base, "wpe", None)
    if not isinstance(table, nn.Embedding):
        return None
    return table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)


class MaskedMeanPooler(nn.Module):
    """Replaces a BERT-style ``pooler``: the average of the non-padding token states.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with mean pooling; their
    ``[CLS]`` state and pre-trained pooler are almost constant across inputs, so a classifier on top of
    them barely learns. The attention mask is handed over by a
    forward pre-hook on the encoder, because the pooler itself is only called with the hidden states.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        self.mask = None
        if mask is None or mask.shape != hidden.shape[:2]:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPooledHead(nn.Module):
    """Replaces a first-token classification head (RoBERTa, MPNet: dense, tanh, dropout, projection) with
    dropout and one linear layer on the masked mean of the token states.

    This mirrors mean pooling on BERT, where the pooler's dense + tanh give way to the mean and the head is
    one linear layer (FedAdapter's head too). Keeping the 768 x 768 dense layer would make MPNet's head
    45 times the size of one width-8 adapter (590 K against 13 K parameters), shipped every round.
    """

    def __init__(self, out_proj: nn.Linear, dropout: nn.Module, pooler: MaskedMeanPooler) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.out_proj = out_proj

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.pooler(features)))


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Make the classifier read the masked mean of the token states (in place); return the model.

    BERT-style models: the ``pooler`` is swapped for :class:`MaskedMeanPooler`. Models without a pooler
    whose head reads the first token and ends in ``out_proj`` (RoBERTa, MPNet): the head becomes
    :class:`MeanPooledHead`.
    """
    base = getattr(model, "base_model", None)
    head = getattr(model, "classifier", None)
    pooler = MaskedMeanPooler()
    if getattr(base, "pooler", None) is not None:
        base.pooler = pooler
    elif base is not None and isinstance(getattr(head, "out_proj", None), nn.Linear):
        model.classifier = MeanPooledHead(head.out_proj, getattr(head, "dropout", nn.Identity()), pooler)
    else:
        raise ValueError(
            f"model.pooling='mean' needs a BERT-style pooler or a first-token classification head; "
            f"{type(model).__name__} has neither. Set model.pooling='model' to use the model's own head"
        )

    def stash_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask

    base.register_forward_pre_hook(stash_mask, with_kwargs=True)
    return model


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


def apply_peft(
    model: nn.Module,
    method: str,
    *,
    task: str = "classification",
    depth: int | None = None,
    width: int = 32,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    orth_reg_weight: float = 0.5,
) -> nn.Module:
    """Wrap ``model`` with ``method`` and set ``requires_grad`` so that exactly the federated part trains.

    A classifier's head always trains. A decoder's tied input/output embedding never does (not even with
    ``full``): it is the largest tensor of a small LLM and would travel every round. Returns the model to
    train (peft returns a wrapper). ``depth=None`` (adapters, layer freezing) means every transformer layer.
    """
    if method not in PEFT_METHODS:
        raise ValueError(f"method={method!r} is not a known PEFT method; allowed: {', '.join(PEFT_METHODS)}")
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

    if rank < 1:
        raise ValueError(f"rank={rank} must be a positive integer")
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    targets = list(target_modules or default_targets(model, method))
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched} match no linear layer of {type(model).__name__}; set target_modules to "
            f"suffixes of its module names, e.g. {_layer_linear_names(linear_names)}"
        )
    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    if method == "lora":
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=heads or None,
            task_type=task_type,
        )
    else:  # svd: peft's AdaLoRA layers (P, Lambda, Q) at a fixed rank; no allocation is ever called.
        config = AdaLoraConfig(
            init_r=rank,
            target_r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=heads or None,
            orth_reg_weight=orth_reg_weight,
            task_type=task_type,  # AdaLoRA's model adds its orthogonality penalty to the loss in every task
            total_step=1,  # required by peft; unused because update_and_allocate is never called here
        )
    return get_peft_model(model, config)


def _freeze_tied_embeddings(model: nn.Module) -> None:
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        embeddings.weight.requires_grad_(False)
