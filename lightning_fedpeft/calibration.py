"""The TX2 device profile, fitted to the FedAdapter paper's published Jetson TX2 timings.

``python -m lightning_fedpeft.calibration --calibrate`` counts the FLOPs of one BERT-base training step
per published point (adapters, adapters over the activation cache, layer freezing; depth 0..12), fits
``overhead_s`` and ``flops_per_s`` by least squares on the relative error, and prints how far the
packaged profile (``resources/devices.yaml``) is from every point. Apart from :mod:`lightning_fedpeft.cost`,
which only uses the fitted numbers.
"""

from __future__ import annotations

import argparse

import torch

from lightning_fedpeft.cost import DeviceProfile, count_train_flops, load_device_profiles

# -- calibration against the published Jetson TX2 table -------------------------------------------------
# FedAdapter paper, Jetson TX2, BERT-base, batch 4, sequence 256: seconds per batch at trainable depth 0..12.
TX2_TABLE: dict[str, list[float]] = {
    "adapter": [0.57, 0.57, 0.63, 0.66, 0.71, 0.75, 0.79, 0.84, 0.89, 0.94, 0.99, 1.03, 1.08],
    "adapter_cached": [round(0.02 + 0.09 * d, 4) for d in range(13)],
    "freeze": [0.5325, 0.612, 0.696, 0.791, 0.883, 0.9713, 1.064, 1.156, 1.2465, 1.33, 1.419, 1.51, 1.7],
}


def bert_base_flops(series: str, depth: int, batch_size: int = 4, seq_len: int = 256, width: int = 8) -> float:
    """Counted FLOPs of one training step of a BERT-base-shaped model (weights on the meta device)."""
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_fedpeft.models import PEFTConfig, apply_peft

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(num_labels=20))
        method = "freeze" if series == "freeze" else "adapter"
        model = apply_peft(model, PEFTConfig(method=method, depth=depth, width=width))
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    # No attention mask: on the meta device the mask helpers would need real values.
    step, _ = count_train_flops(model, {"input_ids": ids, "labels": labels}, cached=series == "adapter_cached")
    return float(step)


def calibrate() -> tuple[DeviceProfile, list[tuple[str, int, float, float]]]:
    """Fit TX2's ``overhead_s`` and ``flops_per_s`` to the table by least squares on relative error.

    Returns the profile and, per point, ``(series, depth, published_s, predicted_s)``.
    """
    points = [(s, d, t, bert_base_flops(s, d)) for s, ts in TX2_TABLE.items() for d, t in enumerate(ts)]
    # Minimize sum ((a + f/T - t) / t)^2: linear least squares in (a, 1/T) with weights 1/t.
    w = torch.tensor([1.0 / t for _, _, t, _ in points], dtype=torch.float64)
    design = torch.stack([w, w * torch.tensor([f for *_, f in points], dtype=torch.float64)], dim=1)
    target = torch.ones(len(points), dtype=torch.float64)
    sol = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
    overhead, inv_thr = float(sol[0]), float(sol[1])
    profile = DeviceProfile("tx2", 1.0 / inv_thr, overhead)
    return profile, [(s, d, t, profile.batch_seconds(f)) for s, d, t, f in points]


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_fedpeft.calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--calibrate", action="store_true", help="fit the TX2 profile to the published table")
    args = parser.parse_args(argv)
    if not args.calibrate:
        parser.print_help()
        return
    profile, rows = calibrate()
    print(f"fitted tx2: flops_per_s={profile.flops_per_s:.3e} overhead_s={profile.overhead_s:.4f}")
    packaged = load_device_profiles()["tx2"]
    print(f"packaged tx2: flops_per_s={packaged.flops_per_s:.3e} overhead_s={packaged.overhead_s:.4f}")
    print("series          depth  published_s  packaged_s  error")
    worst = 0.0
    for series, depth, published, _ in rows:
        predicted = packaged.batch_seconds(bert_base_flops(series, depth))
        err = predicted / published - 1
        worst = max(worst, abs(err))
        print(f"{series:15s} {depth:5d} {published:12.4f} {predicted:11.4f} {err:+7.1%}")
    print(f"worst error of the packaged profile: {worst:.1%}")


if __name__ == "__main__":
    _main()
