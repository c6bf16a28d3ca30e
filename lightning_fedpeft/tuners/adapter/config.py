"""Configuration of bottleneck adapters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdapterConfig:
    """Where adapters go and how large they are.

    Args:
        depth: adapters are placed in the top ``depth`` transformer layers; every layer below stays frozen.
            ``0`` trains only the classification head.
        width: bottleneck size (number of hidden units of each adapter).
        ffn_output: path, inside one transformer layer, of the feed-forward block's output projection;
            the adapter transforms that module's output. ``output.dense`` fits BERT, RoBERTa and MPNet.
    """

    depth: int = 6
    width: int = 32
    ffn_output: str = "output.dense"

    def validate(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the field and the allowed range if the config cannot be applied."""
        if not 0 <= self.depth <= num_layers:
            raise ValueError(
                f"adapter depth={self.depth} is outside the model's layers: allowed 0..{num_layers} "
                f"(the model has {num_layers} transformer layers)"
            )
        if self.width < 1:
            raise ValueError(f"adapter width={self.width} must be a positive integer (e.g. 8, 16, 32, 64)")
