"""Activation cache: run the frozen bottom of the network once per example, then only the trainable top.

When the embeddings and the lower transformer layers are frozen (adapters or unfrozen layers only in the
top ``d`` layers), their output is a fixed function of the input once dropout is off. A client can
compute it once for each of its examples and, in later rounds, run forward and backward through the top
``d`` layers only. This is FedAdapter's activation cache; it is written here because no library offers it.

The cache is keyed by (boundary layer, the example's token ids), so it needs no example indices from the
data pipeline and entries stay valid across rounds and clients. Each example's hidden states are kept
unpadded and re-padded per batch. Memory is bounded (``max_mb``): the least recently used entries are
dropped first, which, because a client's examples are used together, drops the least recently active
clients. Entries for a boundary above the current one become useless when the trained depth grows;
:meth:`ActivationCache.invalidate_above` drops them.

The key holds only while the layers below the boundary never change. A fleet client that trains fewer
layers than it holds (FedAdapter's per-client depth) freezes live layers that other clients train every
round: it sets :attr:`ActivationCache.stable_boundary`, the lowest layer anyone trains, and the cache serves
from there, running the layers between forward without gradients, rather than from rows gone stale.

Entries are stored in float16 by default (half the memory, so twice the examples under the same bound) and
widened to the model's dtype when used.

The cached bottom runs with dropout off, which the uncached path does not: with the cache, the frozen
layers are a deterministic feature extractor (as in FedAdapter), not a regulariser.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_fedpeft.tuners.adapter import find_transformer_layers


class _Given(nn.Module):
    """Stands in for the embeddings: returns hidden states computed elsewhere."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden


def encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, str, nn.ModuleList]:
    """The encoder model holding ``embeddings``, and the parent/attribute/list of the transformer layers."""
    layers = find_transformer_layers(model)
    base = next((m for m in model.modules() if hasattr(m, "embeddings") and hasattr(m, "encoder")), None)
    if base is None:
        raise ValueError(f"activation cache: {type(model).__name__} has no module with `embeddings` and `encoder`")
    for parent in model.modules():
        for attr, child in parent.named_children():
            if child is layers:
                return base, parent, attr, layers
    raise ValueError("activation cache: could not find the parent of the transformer layer stack")


@contextlib.contextmanager
def only_layers(model: nn.Module, start: int, stop: int, given: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the model runs transformer layers ``start:stop`` only.

    With ``given``, the embeddings are replaced by those hidden states (the output of layer ``start - 1``).
    """
    base, parent, attr, layers = encoder_parts(model)
    embeddings = base.embeddings
    try:
        setattr(parent, attr, nn.ModuleList(list(layers)[start:stop]))
        if given is not None:
            base.embeddings = _Given(given)
        yield
    finally:
        setattr(parent, attr, layers)
        base.embeddings = embeddings


def frozen_boundary(model: nn.Module) -> int:
    """Index of the lowest transformer layer with a trainable parameter; 0 if the embeddings train.

    Everything below it is frozen. Equals the number of layers when only the head trains.
    """
    layers = find_transformer_layers(model)
    if any(p.requires_grad for p in _input_embeddings(model).parameters()):
        return 0
    for idx, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return idx
    return len(layers)


def _input_embeddings(model: nn.Module) -> nn.Module:
    """An encoder's whole ``embeddings`` module (words, positions, token types), else the model's input
    embeddings (a decoder's token table: its positions are rotary, computed, not learned)."""
    try:
        return encoder_parts(model)[0].embeddings
    except ValueError as err:
        get = getattr(model, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        if not isinstance(embeddings, nn.Module):
            raise ValueError(
                f"{type(model).__name__} has neither an encoder's `embeddings` nor input embeddings"
            ) from err
        return embeddings


def cache_unsupported(model: nn.Module) -> str | None:
    """Why the activation cache cannot serve ``model``, or ``None`` when it can."""
    try:
        encoder_parts(model)
    except ValueError as err:
        return str(err)
    return None


CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationCache:
    """Caches the frozen bottom's output per example; see the module docstring.

    Args:
        max_mb: memory bound of the cached hidden states, in MiB.
        dtype: storage dtype of the cached hidden states (``float16``, ``bfloat16`` or ``float32``).
    """

    def __init__(self, max_mb: float = 1024.0, dtype: str = "float16") -> None:
        if not max_mb > 0:
            raise ValueError(f"activation cache max_mb={max_mb} must be positive")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"activation cache dtype={dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
        self.max_bytes = int(max_mb * 2**20)
        self.dtype = CACHE_DTYPES[dtype]
        self._entries: OrderedDict[tuple[int, bytes], torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.last: dict[str, int] = {}  # the last batch: boundary, rows, misses (read by the cost model)
        self._layers: int | None = None
        self._compute_dtype = torch.float32  # the bottom's output dtype, as the last fill saw it
        # No boundary above this one (None: the model's frozen boundary); see the module docstring.
        self.stable_boundary: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def invalidate_above(self, boundary: int) -> int:
        """Drop entries cached for a boundary above ``boundary`` (the trained depth grew); return how many."""
        stale = [k for k in self._entries if k[0] > boundary]
        for key in stale:
            self.nbytes -= self._nbytes(self._entries.pop(key))
        return len(stale)

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run ``model(**batch)``, taking the frozen bottom's output from the cache where possible."""
        boundary = frozen_boundary(model)
        if self.stable_boundary is not None:
            boundary = min(boundary, self.stable_boundary)
        input_ids = batch.get("input_ids")
        if boundary == 0 or input_ids is None:
            self.last = {"boundary": 0, "rows": 0, "misses": 0}
            return model(**batch)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        lengths = mask.sum(dim=1).tolist()
        keys = [(boundary, input_ids[i, : int(n)].cpu().numpy().tobytes()) for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        if missing:
            self._fill(model, input_ids[missing], mask[missing], [keys[i] for i in missing], boundary)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        self.last = {"boundary": boundary, "rows": len(keys), "misses": len(missing)}
        rows = []
        for key in keys:
            self._entries.move_to_end(key)
            rows.append(self._entries[key])
        hidden = rows[0].new_zeros((len(rows), input_ids.shape[1], rows[0].shape[-1]), dtype=self._compute_dtype)
        for i, row in enumerate(rows):
            hidden[i, : row.shape[0]] = row
        with only_layers(model, boundary, self._num_layers(model), given=hidden):
            out = model(**batch)
        self._evict()
        return out

    def _fill(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keys: list, boundary: int) -> None:
        # Dropout off: the cached bottom must be a deterministic function of the input. And of the input
        # alone: each row runs by itself at its own length, not padded into whichever batch it first came
        # in (that changes the float rounding), so a run resumed with an empty cache computes the same
        # values the uninterrupted one cached. It costs about 1.3x a batched fill, once per example.
        base = encoder_parts(model)[0]
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad(), only_layers(model, 0, boundary):
                for i, key in enumerate(keys):
                    n = int(mask[i].sum())
                    row = base(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).last_hidden_state
                    self._compute_dtype = row.dtype  # what the stored rows are widened back to
                    self._entries[key] = row[0].to(self.dtype, copy=True)
                    self.nbytes += self._nbytes(self._entries[key])
        finally:
            base.train(was_training)

    def _num_layers(self, model: nn.Module) -> int:
        if self._layers is None:
            self._layers = len(encoder_parts(model)[3])
        return self._layers

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._entries:
            _, row = self._entries.popitem(last=False)
            self.nbytes -= self._nbytes(row)
            self.evictions += 1
