"""bench/gpu.py dry-runs on the CPU (--tiny): every section's path runs at toy sizes, so the one prepared GPU
run is not the first time its code runs. Its figures mean nothing here; what is checked is that every section
ran and that the checks it makes hold (two ranks train what one process trains)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_dry_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = {k: v["failed"] for k, v in results.items() if isinstance(v, dict) and "failed" in v}
    assert not failed, failed
    rows = results["step"]["rows"]
    assert [r["recipe"] for r in rows] == ["LoRA bf16-mixed", "LoRA bf16-true", "FedARA bf16-mixed"]
    assert all(r["ms_per_step"] > 0 and r["tflop_per_step"] > 0 for r in rows)
    assert results["ranks"]["loss_relative_gap"] <= 1e-6  # two ranks train exactly what one process trains
    assert len(results["ranks"]["2 ranks"]["losses"]) == 3
    assert math.isfinite(results["qlora8b"]["train_loss"]) and results["qlora8b"]["mb_up"] > 0
    assert results["load"]["device"] == "cpu" and results["load"]["seconds"] > 0
    assert "skipped" in results["deepspeed"]  # no CUDA here: said, not failed
    assert "summary (" in proc.stdout
