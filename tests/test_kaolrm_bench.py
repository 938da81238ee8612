"""`headforge bench --kaolrm`: the section runs (on the tests' small config, for speed), checks its
exports' parity and returns every key docs/benchmarks.md documents, with ratios that are the
quotient of the figures beside them. No timing is asserted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kaolrm_synthetic import SMALL
from typer.testing import CliRunner

from headforge.benchmarks import OPTIONAL_SECTIONS
from headforge.benchmarks.kaolrm import BATCHES, run
from headforge.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _documented_keys() -> set[str]:
    text = DOCS.read_text().split("\n## KaoLRM\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in text.splitlines() if line.startswith("| `kaolrm")]
    keys = {key for line in table for key in re.findall(r"`(kaolrm[a-z0-9_<>]+)`", line.split("|")[1])}
    return {key.replace("<n>", str(n)) for key in keys for n in BATCHES}


def test_kaolrm_section_returns_the_documented_keys() -> None:
    result = run(quick=True, config=SMALL)
    assert result["kaolrm_config"] == "custom" and result["kaolrm_points"] == 8000
    assert set(result) == _documented_keys()
    assert result["kaolrm_image_parity_max_abs"] < 1e-3 and result["kaolrm_gaussians_parity_max_abs"] < 1e-3
    for heads in BATCHES:
        key = f"kaolrm_b{heads}"
        eager = result[f"{key}_image_eager_ms_per_head"] + result[f"{key}_gaussians_eager_ms_per_head"]
        ort = result[f"{key}_image_ort_ms_per_head"] + result[f"{key}_gaussians_ort_ms_per_head"]
        assert result[f"{key}_eager_ms_per_head"] == pytest.approx(eager, abs=0.11)
        assert result[f"{key}_ort_ms_per_head"] == pytest.approx(ort, abs=0.11)
        assert result[f"{key}_ratio_ort_vs_eager"] == pytest.approx(ort / eager, rel=0.02)


def test_bench_cli_offers_the_kaolrm_section() -> None:
    assert "kaolrm" in OPTIONAL_SECTIONS
    output = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output
    assert "--kaolrm" in output
