"""The token cache: a split's token ids saved once per (tokenizer, settings, texts), read back by any process.

The key is a digest of what the ids depend on (the tokenizer's folder, ``max_length``, the task's settings
and every text), so a changed file or setting never reads stale ids. Writes are atomic: processes that
tokenize the same split at once (ranks on one machine) never read half a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "lightning_fedpeft")


def cache_path(root: str | None, key: Sequence[str], texts: Sequence[str]) -> Path:
    """Where the ids of ``texts`` tokenized with settings ``key`` live under ``root`` (default: the user's cache)."""
    digest = hashlib.sha1()
    for part in key:
        digest.update(part.encode())
    for text in texts:
        digest.update(text.encode("utf-8", "replace"))
        digest.update(b"\0")
    return Path(root or DEFAULT_ROOT) / f"tokens-{digest.hexdigest()[:20]}.pt"


def load_or_build(path: Path, build: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The cached tokens at ``path``, else ``build()``'s, saved there; and whether the cache had them."""
    if path.is_file():
        return torch.load(path, weights_only=True), True
    tokens = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(tokens, tmp)
    os.replace(tmp, path)  # atomic: parallel processes never read a half-written cache
    return tokens, False
