"""What the package knows about architectures: the PEFT methods and tasks, the default target modules by
model type, where a decoder layer's feed-forward output is, and how long an input a model can read."""

from __future__ import annotations

from typing import Literal

from torch import nn

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
