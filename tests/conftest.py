"""Shared fixtures: a tiny local corpus and the 2-layer cut of the packaged MiniLM (fast on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
