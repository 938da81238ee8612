"""Smoke tests of `headforge bench --quick` and its `flame` section: they run and return the keys
that docs/benchmarks.md documents (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from headforge.benchmarks import SECTIONS
from headforge.benchmarks.flame import ADAM_STEPS, run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _documented_keys(section: str, prefix: str) -> set[str]:
    """The `<prefix>*` keys in the key table of a docs/benchmarks.md section."""
    text = DOCS.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in text.splitlines() if line.startswith(f"| `{prefix}")]
    return {key for line in table for key in re.findall(rf"`({prefix}[a-z0-9_]+)`", line.split("|")[1])}


def test_quick_flame_benchmark_returns_the_documented_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(tmp_path / "absent.npz"))  # the random asset
    assert "flame" in SECTIONS
    result = run(quick=True)
    documented = _documented_keys("FLAME fit", "flame_")
    assert len(documented) >= 10
    assert set(result) == documented
    assert result["flame_heads"] == 8 and result["flame_asset"] == "random (FLAME sizes)"
    assert result["flame_adam_steps"] == ADAM_STEPS // 2  # quick mode halves Adam's steps
    for key, value in result.items():
        if key.endswith(("_ms_per_head", "_px", "_mm")):
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (key, value)
    # The fit recovers the known heads (1 px of landmark noise): the residual stays near the noise.
    assert result["flame_fit_residual_px"] < 2.0 and result["flame_fit_iterations"] >= 1


def test_bench_quick_prints_one_json_line_with_every_documented_key(tmp_path: Path) -> None:
    """The command users run: one JSON line on stdout, holding every key the docs explain."""
    env = {**os.environ, "HEADFORGE_FLAME_ASSET": str(tmp_path / "absent.npz")}
    completed = subprocess.run(
        [sys.executable, "-m", "headforge", "bench", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stdout[-2000:]
    result = json.loads(lines[0])
    for section, prefix in (
        ("Detection and landmarks", "landmarks_"),
        ("End to end", "e2e_"),
        ("FLAME fit", "flame_"),
    ):
        documented = _documented_keys(section, prefix)
        assert len(documented) >= 4, section
        assert documented <= set(result), (section, sorted(documented - set(result)))
    ratio = result["landmarks_ratio_vs_litert"]
    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
    assert result["landmarks_backend"].startswith(
        "onnxruntime"
    )  # our exported models, not the LiteRT fallback
    assert result["landmarks_heads"] == result["landmarks_heads_litert"] >= result["landmarks_photos"]
