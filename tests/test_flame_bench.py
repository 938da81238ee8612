"""Smoke test of the benchmark section `flame` in its quick mode: it runs and returns the keys
that docs/benchmarks.md documents (no timing is asserted)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from headforge.benchmarks import SECTIONS
from headforge.benchmarks.flame import ADAM_STEPS, run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _documented_keys() -> set[str]:
    """The `flame_*` keys in the key table of docs/benchmarks.md's FLAME section."""
    section = DOCS.read_text().split("\n## FLAME fit\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `flame_")]
    return {key for line in table for key in re.findall(r"`(flame_[a-z_]+)`", line.split("|")[1])}


def test_quick_flame_benchmark_returns_the_documented_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(tmp_path / "absent.npz"))  # the random asset
    assert "flame" in SECTIONS
    result = run(quick=True)
    documented = _documented_keys()
    assert len(documented) >= 10
    assert set(result) == documented
    assert result["flame_heads"] == 8 and result["flame_asset"] == "random (FLAME sizes)"
    assert result["flame_adam_steps"] == ADAM_STEPS // 2  # quick mode halves Adam's steps
    for key, value in result.items():
        if key.endswith(("_ms_per_head", "_px", "_mm")):
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (key, value)
    # The fit recovers the known heads (1 px of landmark noise): the residual stays near the noise.
    assert result["flame_fit_residual_px"] < 2.0 and result["flame_fit_iterations"] >= 1
