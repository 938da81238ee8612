"""`headforge models import vggheads`: every accepted format imported, exported and checked for
parity (ORT against PyTorch within 1e-4 × max|ref|), and every bad input refused with
`invalid_checkpoint` while the model repository stays exactly as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from vggheads_weights import seeded_s, seeded_s_state

from headforge.errors import InvalidCheckpointError
from headforge.export.repository import read_entry
from headforge.models import vggheads as vh
from headforge.models.importers import IMPORTERS, ImportOptions
from headforge.models.vggheads_import import current_entry, import_vggheads


def _tree(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_entry(root: Path, report_version: str, *, fused_source: bool) -> dict[str, object]:
    entry = read_entry("vggheads", report_version, root)
    assert entry is not None and entry.is_intact()
    manifest = entry.manifest
    assert manifest["family"] == "vggheads" and manifest["variant"] == "s"
    assert manifest["fused"] is fused_source
    assert manifest["parameters"] == 17_004_954  # exported fused, whatever the source form
    assert manifest["source"]["sha256"] and manifest["outputs_layout"] == "all_anchors"
    parity = manifest["parity"]
    assert parity["max_rel_error"] <= 1e-4
    return manifest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vggheads_checkpoints")
    state = seeded_s_state()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, folder / "unfused.pth")
    fused = seeded_s(fused=True)
    save_file(fused.state_dict(), str(folder / "fused.safetensors"))

    class Released(nn.Module):
        """Shaped like the released wrapper: `model.*`, plus a post-processing buffer."""

        def __init__(self) -> None:
            super().__init__()
            self.model = seeded_s()
            self.post_process = nn.Module()
            self.post_process.register_buffer("max_batch", torch.arange(8192))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.model(x)

    with torch.no_grad():
        torch.jit.trace(Released().eval(), torch.rand(1, 3, 640, 640)).save(str(folder / "released.trcd"))
    return {
        "unfused": folder / "unfused.pth",
        "fused": folder / "fused.safetensors",
        "torchscript": folder / "released.trcd",
    }


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEADFORGE_HOME": str(home), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "headforge", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_unfused_state_dict_through_the_cli(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = _cli("models", "import", "vggheads", str(checkpoints["unfused"]), "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert {"family", "variant", "version", "parameters", "parity_max_abs"} <= set(summary)
    assert summary["family"] == "vggheads" and summary["variant"] == "s"
    assert summary["parameters"] == 17_004_954
    root = tmp_path / "models"
    manifest = _check_entry(root, summary["version"], fused_source=False)
    assert summary["parity_max_abs"] == manifest["parity"]["max_abs_error"]  # type: ignore[index]
    # The exported graph computes what our module computes on a real photo's canvas too.
    entry = current_entry(root)
    assert entry is not None and entry.version == summary["version"]
    import onnxruntime as ort

    from headforge.pipeline.vggheads import letterbox

    canvas, _ = letterbox(np.asarray(__import__("PIL.Image").Image.open(_astronaut()).convert("RGB")))
    session = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"input": canvas[None]})
    with torch.no_grad():
        reference = seeded_s(fused=False).decode_all(torch.from_numpy(canvas[None]))
    for got, expected in zip(ours, reference, strict=True):
        bound = 1e-4 * float(expected.abs().max())
        assert float(np.abs(got - expected.numpy()).max()) <= bound


def _astronaut() -> Path:
    return Path(__file__).parent.parent / "examples" / "astronaut.jpg"


def test_fused_safetensors_and_torchscript(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "models"
    fused = import_vggheads(checkpoints["fused"], ImportOptions(root=root))
    assert fused.variant == "s" and fused.details["fused"] is True
    _check_entry(root, fused.version, fused_source=True)
    traced = IMPORTERS["vggheads"](checkpoints["torchscript"], ImportOptions(root=root))
    assert traced.details["format"] == "torchscript" and traced.details["fused"] is False
    _check_entry(root, traced.version, fused_source=False)
    # Same weights in three forms: the exported graphs agree.
    one = read_entry("vggheads", fused.version, root)
    two = read_entry("vggheads", traced.version, root)
    assert one is not None and two is not None
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 640, 640)).astype(np.float32)
    a = ort.InferenceSession(str(one.model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    b = ort.InferenceSession(str(two.model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for left, right in zip(a, b, strict=True):
        assert float(np.abs(left - right).max()) <= 1e-4 * float(np.abs(left).max())

    # The released ONNX route: served as is after its signature is checked.
    released = tmp_path / "vgg_heads_s.onnx"
    shutil.copy(one.model_path, released)
    served = import_vggheads(released, ImportOptions(root=root))
    assert served.parity_max_abs is None and served.variant == "s"
    entry = read_entry("vggheads", served.version, root)
    assert entry is not None and entry.is_intact()
    assert entry.model_path.read_bytes() == released.read_bytes()
    assert entry.manifest["export"] == {"served_as_is": True}


# --- bad input -----------------------------------------------------------------------------------


def _tiny_onnx(path: Path) -> None:
    model = nn.Conv2d(3, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, input_names=["input"])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name → (file, text the error must contain)."""
    folder = tmp_path_factory.mktemp("vggheads_bad")
    state = {k: torch.zeros_like(v) for k, v in vh.build("s").state_dict().items()}
    torch.save(state, folder / "good.pth")
    save_file(state, str(folder / "good.safetensors"))
    good = (folder / "good.pth").read_bytes()
    cases: dict[str, tuple[bytes | None, str]] = {
        "notes.pth": (b"these are not weights\n", "notes.pth is not a readable PyTorch state dict"),
        "truncated.pth": (good[: len(good) // 2], "truncated.pth is not a readable PyTorch state dict"),
        "truncated.safetensors": (
            (folder / "good.safetensors").read_bytes()[:5000],
            "not a readable safetensors",
        ),
        "truncated.trcd": (good[:3000], "truncated.trcd is not a readable TorchScript archive"),
        "photo.onnx": (_astronaut().read_bytes(), "photo.onnx is not a readable ONNX model"),
    }
    written = {}
    for name, (data, expect) in cases.items():
        (folder / name).write_bytes(data or b"")
        written[name] = (folder / name, expect)
    # Another family's checkpoint: headforge's own iris network.
    from headforge.models.iris import IrisLandmark

    torch.save(IrisLandmark().state_dict(), folder / "iris.pth")
    written["iris.pth"] = (folder / "iris.pth", "not a VGGHeads checkpoint: none of its")
    # Mismatched shape and a missing key in an otherwise complete S checkpoint.
    wrong = dict(state)
    wrong["heads.head2.cls_pred.weight"] = torch.zeros(2, 192, 1, 1)
    torch.save(wrong, folder / "wrong_shape.pth")
    written["wrong_shape.pth"] = (
        folder / "wrong_shape.pth",
        "'heads.head2.cls_pred.weight' has shape [2, 192, 1, 1]",
    )
    missing = {k: v for k, v in state.items() if k != "neck.neck3.blocks.conv2.bn.running_var"}
    save_file(missing, str(folder / "missing.safetensors"))
    written["missing.safetensors"] = (
        folder / "missing.safetensors",
        "missing key 'neck.neck3.blocks.conv2.bn.running_var'",
    )
    extra = {**state, "heads.head4.cls_pred.weight": torch.zeros(1)}
    torch.save(extra, folder / "extra.pth")
    written["extra.pth"] = (folder / "extra.pth", "unexpected key 'heads.head4.cls_pred.weight'")
    _tiny_onnx(folder / "tiny.onnx")
    written["tiny.onnx"] = (folder / "tiny.onnx", "not a VGGHeads graph")
    torch.save({"step": 3, "lr": 0.1}, folder / "no_tensors.pth")
    written["no_tensors.pth"] = (folder / "no_tensors.pth", "no mapping of names to tensors")
    return written


def test_every_bad_input_is_refused_and_changes_nothing(
    bad_files: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "other" / "v1").mkdir(parents=True)
    (root / "other" / "v1" / "manifest.json").write_text("{}")
    before = _tree(root)
    for name, (path, expect) in bad_files.items():
        with pytest.raises(InvalidCheckpointError) as raised:
            import_vggheads(path, ImportOptions(root=root))
        assert raised.value.code == "invalid_checkpoint", name
        assert expect in raised.value.message, (name, raised.value.message)
        assert _tree(root) == before, name
        assert sorted(p.name for p in root.iterdir()) == ["other"], name
    good = bad_files["wrong_shape.pth"][0].parent / "good.pth"
    with pytest.raises(InvalidCheckpointError, match="VGGHeads-L"):
        import_vggheads(good, ImportOptions(variant="l", root=root))
    assert _tree(root) == before


def test_cli_exits_2_with_the_code(bad_files: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    path, expect = bad_files["wrong_shape.pth"]
    result = _cli("models", "import", "vggheads", str(path), home=tmp_path)
    assert result.returncode == 2
    assert "invalid_checkpoint" in result.stderr and expect in result.stderr
    assert not (tmp_path / "models").exists()
    unknown = _cli("models", "import", "nosuchfamily", str(path), home=tmp_path)
    assert unknown.returncode == 2 and "vggheads" in unknown.stderr
