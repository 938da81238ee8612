"""TensorRT for imported entries: `build-engine` through ONNX Runtime's TensorRT provider (GPU only,
skipped cleanly elsewhere), its clear refusal without one, and scripts/gpu_check.sh's one JSON line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from headforge.errors import ModelExportError
from headforge.export.model import export_model
from headforge.export.onnx import ExportSpec, TensorSpec
from headforge.export.tensorrt import build_entry_engine, trt_provider_options

SPEC = ExportSpec(inputs=(TensorSpec("input", (3, 16, 16)),), outputs=("y",))
HAS_TRT = "TensorrtExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _entry(root: Path) -> Path:
    torch.manual_seed(0)
    return export_model(
        nn.Conv2d(3, 4, 3), SPEC, "tiny", "1", source={"checkpoint": "t", "sha256": ""}, root=root
    )


@pytest.mark.skipif(HAS_TRT, reason="the TensorRT provider is available here")
def test_build_engine_without_tensorrt_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    directory = _entry(tmp_path)
    before = (directory / "manifest.json").read_bytes()
    with pytest.raises(ModelExportError, match="TensorRT provider is not available"):
        build_entry_engine(directory)
    assert (directory / "manifest.json").read_bytes() == before


def test_worker_options_follow_the_recorded_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path))
    directory = _entry(tmp_path / "models")
    options = trt_provider_options(directory / "model.onnx", "tiny")
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt_cache" / "tiny" / "1")
    assert options["trt_profile_opt_shapes"] == "input:8x3x16x16"
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["tensorrt"] = {"fp16": False}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert trt_provider_options(directory / "model.onnx", "tiny")["trt_fp16_enable"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs a CUDA GPU and ONNX Runtime's TensorRT provider")
def test_engine_is_built_into_the_cache_workers_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headforge.models.runtime import OrtNetwork

    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path))
    directory = _entry(tmp_path / "models")
    settings = build_entry_engine(directory)
    assert settings["engine_files"], settings
    network = OrtNetwork(
        directory / "model.onnx", "tiny", 2, ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    )
    assert network.providers[0] == "TensorrtExecutionProvider"
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    cpu = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    np.testing.assert_allclose(network.run(x)[0], cpu[0], atol=1e-2)


def test_gpu_check_prints_one_json_line() -> None:
    script = Path(__file__).parent.parent / "scripts" / "gpu_check.sh"
    if HAS_TRT:
        pytest.skip("on a GPU machine the script runs the full check (minutes); run it by hand")
    completed = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "error" in json.loads(lines[0])
