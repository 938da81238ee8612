"""The general export path: any module + input spec → ONNX (dynamic batch, parity, manifest) → TensorRT."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from headforge.errors import ModelExportError
from headforge.export.model import export_model
from headforge.export.onnx import ExportSpec, TensorSpec, export_onnx
from headforge.export.repository import list_entries, read_entry, sha256_file
from headforge.export.tensorrt import add_engine_to_entry, tensorrt_available


class TwoInputNet(nn.Module):
    """A small user model: an image and a per-sample vector in, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 + 4, 5)

    def forward(self, image: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(image))
        pooled = features.mean(dim=(2, 3))
        return self.head(torch.cat([pooled, code], dim=1)), features


class DriftsWhenExported(nn.Module):
    """Behaves differently under export, so the parity check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = 1.0 if torch.onnx.is_in_onnx_export() else 0.0
        return x * 2.0 + offset


SPEC = ExportSpec(
    inputs=(TensorSpec("image", (3, 32, 32), value_range=(-1.0, 1.0)), TensorSpec("code", (4,))),
    outputs=("scores", "features"),
)


def test_export_writes_a_complete_repository_entry(tmp_path: Path) -> None:
    module = TwoInputNet().eval()
    source = {"checkpoint": "unit-test", "sha256": "0" * 64}
    directory = export_model(
        module, SPEC, "two_input", "1", source=source, root=tmp_path, extra={"note": "x"}
    )
    assert directory == tmp_path / "two_input" / "1"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["model_sha256"] == sha256_file(directory / "model.onnx")
    assert manifest["inputs"] == [
        {"name": "image", "shape": ["batch", 3, 32, 32], "dtype": "float32"},
        {"name": "code", "shape": ["batch", 4], "dtype": "float32"},
    ]
    assert [o["name"] for o in manifest["outputs"]] == ["scores", "features"]
    assert manifest["outputs"][1]["shape"][1:] == [8, 16, 16]
    assert manifest["source"] == source and manifest["note"] == "x"
    assert 0.0 <= manifest["parity"]["max_rel_error"] <= SPEC.parity_tolerance
    assert manifest["export"]["opset"] == SPEC.opset
    # Images pull models as root at build time and serve them as another user: entries stay readable.
    for name in ("manifest.json", "model.onnx"):
        assert (directory / name).stat().st_mode & 0o044 == 0o044, name
    entry = read_entry("two_input", "1", tmp_path)
    assert entry is not None and entry.is_intact()
    assert [e.name for e in list_entries(tmp_path)] == ["two_input"]

    # Dynamic batch: sizes other than the tracing example run and match PyTorch.
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch in (1, 5):
        image = rng.uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32)
        code = rng.uniform(0, 1, (batch, 4)).astype(np.float32)
        scores, features = session.run(None, {"image": image, "code": code})
        with torch.no_grad():
            expected_scores, expected_features = module(torch.from_numpy(image), torch.from_numpy(code))
        np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)
        np.testing.assert_allclose(features, expected_features.numpy(), atol=1e-5)

    # A changed model file is detected.
    (directory / "model.onnx").write_bytes(b"corrupt")
    assert not entry.is_intact()


def test_parity_failure_is_an_export_error_and_leaves_nothing_behind(tmp_path: Path) -> None:
    spec = ExportSpec(inputs=(TensorSpec("x", (6,)),), outputs=("y",))
    with pytest.raises(ModelExportError) as caught:
        export_onnx(DriftsWhenExported(), spec, tmp_path / "drift" / "model.onnx")
    assert caught.value.code == "model_export_failed"
    assert "differs from PyTorch" in caught.value.message
    assert not (tmp_path / "drift" / "model.onnx").exists()


def test_given_real_samples_are_used_for_parity(tmp_path: Path) -> None:
    from skimage.data import astronaut

    photo = astronaut()[::16, ::16].astype(np.float32) / 127.5 - 1.0  # 32×32×3, a real image
    image = np.ascontiguousarray(photo.transpose(2, 0, 1)[None])
    code = np.zeros((1, 4), np.float32)
    result = export_onnx(TwoInputNet(), SPEC, tmp_path / "m.onnx", samples=[image, code])
    assert result.settings["parity_samples"] == "given"
    assert result.max_rel_error <= SPEC.parity_tolerance


@pytest.mark.gpu
def test_tensorrt_engine_from_an_entry(tmp_path: Path) -> None:
    if not tensorrt_available() or not torch.cuda.is_available():
        pytest.skip("TensorRT and a CUDA GPU are needed to build engines")
    directory = export_model(
        TwoInputNet(), SPEC, "two_input", "1", source={"checkpoint": "t", "sha256": ""}, root=tmp_path
    )
    plan = add_engine_to_entry(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert plan.stat().st_size > 0 and manifest["tensorrt"]["plan_sha256"] == sha256_file(plan)


def test_tensorrt_absent_is_a_clear_error(tmp_path: Path) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    from headforge.export.tensorrt import build_engine

    with pytest.raises(ModelExportError, match="TensorRT is not installed"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan")


def _stand_in_tensorrt(serialized: bytes | None) -> types.ModuleType:
    """A stand-in for the `tensorrt` package with just the builder calls `build_engine` makes, whose
    build returns `serialized`. It exercises the file handling on machines without a GPU; the real
    engine build is test_tensorrt_engine_from_an_entry."""
    module = types.ModuleType("tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    module.__version__ = "stand-in"  # type: ignore[attr-defined]
    shapes: dict[str, Any] = {}

    class Builder:
        def __init__(self, logger: object) -> None:
            self.network = types.SimpleNamespace(
                num_inputs=1, get_input=lambda index: types.SimpleNamespace(name="x", shape=(-1, 6))
            )

        def create_network(self, flags: int) -> object:
            return self.network

        def create_builder_config(self) -> object:
            return types.SimpleNamespace(
                set_memory_pool_limit=lambda *args: None,
                set_flag=lambda *args: None,
                add_optimization_profile=lambda profile: None,
            )

        def create_optimization_profile(self) -> object:
            return types.SimpleNamespace(set_shape=lambda name, *sizes: shapes.__setitem__(name, sizes))

        def build_serialized_network(self, network: object, config: object) -> bytes | None:
            return serialized

    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})  # type: ignore[attr-defined]
    module.Builder = Builder  # type: ignore[attr-defined]
    module.OnnxParser = lambda network, logger: types.SimpleNamespace(parse=lambda data: True, num_errors=0)  # type: ignore[attr-defined]
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]
    module.BuilderFlag = types.SimpleNamespace(FP16=0)  # type: ignore[attr-defined]
    module.shapes = shapes  # type: ignore[attr-defined]
    return module


def test_engine_plan_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan appears whole or not at all: a failed build or a failed write keeps the previous
    plan byte for byte and leaves no temp file beside it."""
    from headforge.export.tensorrt import build_engine

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"read by the stand-in parser, which accepts anything")
    plan = tmp_path / "model.plan"

    monkeypatch.setitem(sys.modules, "tensorrt", _stand_in_tensorrt(b"engine v1" * 1000))
    settings = build_engine(onnx_path, plan, batch=(1, 4, 16))
    assert plan.read_bytes() == b"engine v1" * 1000
    assert settings == {"tensorrt": "stand-in", "fp16": True, "batch_profile": [1, 4, 16]}
    assert sys.modules["tensorrt"].shapes == {"x": ((1, 6), (4, 6), (16, 6))}  # type: ignore[attr-defined]

    monkeypatch.setitem(sys.modules, "tensorrt", _stand_in_tensorrt(None))
    with pytest.raises(ModelExportError, match="failed to build"):
        build_engine(onnx_path, plan)
    assert plan.read_bytes() == b"engine v1" * 1000

    def refuse_rename(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(sys.modules, "tensorrt", _stand_in_tensorrt(b"engine v2" * 1000))
    monkeypatch.setattr("headforge.files.os.replace", refuse_rename)
    with pytest.raises(OSError, match="No space left"):
        build_engine(onnx_path, plan)
    assert plan.read_bytes() == b"engine v1" * 1000
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.plan"]
