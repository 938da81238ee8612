"""The `vggheads` pipeline: preprocessing and pose facts, then end to end on a real photo through
an imported checkpoint, with the synthetic FLAME and without it.

The network's weights are seeded random (plumbing only, never a result). So that the path from
detection to meshes is exercised honestly, the stride-32 head is rigged through its final biases:
every one of its 400 anchors scores sigmoid(5), the rotation is frontal, the scale is known and the
translation is the anchor centre; the other heads are silenced. What the test then checks follows
from those biases, not from the random weights."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flame_synthetic import imported_synthetic_flame
from numpy.typing import NDArray
from PIL import Image
from vggheads_weights import seeded_s

from headforge.models.importers import ImportOptions
from headforge.models.runtime import ModelSet, OrtNetwork, repository_network_path
from headforge.models.vggheads_import import import_vggheads
from headforge.pipeline import vggheads as pv
from headforge.pipeline.pose import angles_to_rotation
from headforge.pipeline.run import ReconstructOptions, pipeline_missing_reason, reconstruct_image
from headforge.schemas import validate_result

FRONTAL = np.diag([1.0, -1.0, -1.0])


@pytest.mark.parametrize(
    ("yaw", "pitch", "roll"), [(0, 0, 0), (30, 0, 0), (0, 20, 0), (0, 0, -15), (25, -10, 5), (-60, 35, 40)]
)
def test_pose_conversion_on_known_rotations(yaw: float, pitch: float, roll: float) -> None:
    rotation = angles_to_rotation(yaw, pitch, roll)
    ours = pv.pose_angles(rotation)
    np.testing.assert_allclose(ours, (yaw, pitch, roll), atol=1e-9)
    np.testing.assert_allclose(pv.model_euler(rotation), ours, atol=1e-9)  # the package reads the same
    # Through the 6D encoding the network emits (first two columns of R).
    six = np.concatenate([rotation[:, 0], rotation[:, 1]])
    np.testing.assert_allclose(pv.rotation_from_6d(six), rotation, atol=1e-12)


def test_model_convention_reference_points() -> None:
    """§C.4: R = I gives (roll, pitch, yaw) = (0, −180, 0); diag(1, −1, −1) gives (0, 0, 0)."""
    yaw, pitch, roll = pv.model_euler(np.eye(3))
    assert (yaw, abs(pitch), roll) == pytest.approx((0, 180, 0))
    assert pv.model_euler(FRONTAL) == pytest.approx((0, 0, 0))
    assert pv.pose_angles(FRONTAL) == pytest.approx((0, 0, 0))


def test_letterbox_facts() -> None:
    """§C.5: 1280×720 → scale 0.5, 640×360 resized, padding (0, 140) with 127."""
    photo = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    tensor, frame = pv.letterbox(photo)
    assert tensor.shape == (3, 640, 640) and tensor.dtype == np.float32
    assert (frame.scale, frame.resized, frame.left, frame.top) == (0.5, (640, 360), 0, 140)
    assert np.all(tensor[:, :140] == np.float32(127 / 255)) and np.all(
        tensor[:, 500:] == np.float32(127 / 255)
    )
    assert tensor.max() <= 1.0 and tensor.min() >= 0.0
    np.testing.assert_allclose(frame.to_image(np.array([[320.0, 320.0]])), [[640.0, 360.0]])
    odd = np.zeros((301, 100, 3), np.uint8)
    _, frame = pv.letterbox(odd)
    assert frame.resized == (212, 640) and frame.left == (640 - 212) // 2  # int() truncation
    bgr, _ = pv.letterbox(photo[:8, :8], channel_order="bgr")
    rgb, _ = pv.letterbox(photo[:8, :8])
    np.testing.assert_array_equal(bgr, rgb[::-1])


def test_nms_and_selection() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = np.array([0.9, 0.8, 0.7, 0.4])
    assert pv.nms(boxes, scores, 0.5).tolist() == [0, 2]  # 1 overlaps 0 by 0.68, 3 duplicates 0
    assert pv.nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    flame = np.zeros((4, 413))
    flame[:, pv.ROT_A1] = FRONTAL[:, 0]
    flame[:, pv.ROT_A2] = FRONTAL[:, 1]
    flame[:, pv.SCALE] = 640.0
    flame[:, pv.TRANSLATION] = [[5, 5, 2]] * 4
    frame = pv.Letterbox(scale=0.5, left=0, top=140, width=1280, height=720, resized=(640, 360))
    heads = pv.select_heads(boxes + np.array([0, 140, 0, 140]), scores, flame, frame)
    assert [round(h.score, 2) for h in heads] == [0.9, 0.7]  # 0.4 is below the score threshold
    assert heads[0].box.tolist() == [0, 0, 20, 20]
    assert heads[0].translation.tolist() == [10, -270, 4] and heads[0].scale == 1280.0
    assert (heads[0].yaw, heads[0].pitch, heads[0].roll) == pytest.approx((0, 0, 0))
    notes: list[str] = []
    capped = pv.select_heads(
        boxes + np.array([0, 140, 0, 140]), scores, flame, frame, max_heads=1, notes=notes
    )
    assert [round(h.score, 2) for h in capped] == [0.9]
    assert notes == ["kept the 1 most confident of 2 heads detected (max_heads=1)"]
    notes.clear()
    pv.select_heads(boxes + np.array([0, 140, 0, 140]), scores, flame, frame, max_heads=2, notes=notes)
    assert notes == []


# --- end to end -----------------------------------------------------------------------------------

SCORE_BIAS = 5.0
SCALE_BIAS = math.log(400 * 0.05 / 32)  # 400 canvas px per FLAME metre at stride 32


def _rigged_checkpoint(path: Path) -> None:
    model = seeded_s()
    with torch.no_grad():
        for head in (model.heads.head1, model.heads.head2):
            head.cls_pred.weight.zero_()
            head.cls_pred.bias.fill_(-20.0)  # type: ignore[union-attr]
        head = model.heads.head3
        head.cls_pred.weight.zero_()
        head.cls_pred.bias.fill_(SCORE_BIAS)  # type: ignore[union-attr]
        biases = {
            "rotation": [0.0, -1.0, 0.0, 0.0, 0.0, 0.0],  # a2 = (0, -1, 0); jaw = 0
            "jaw": [1.0, 0.0, 0.0],  # a1 = (1, 0, 0)  → R = diag(1, -1, -1), frontal
            "scale": [SCALE_BIAS],
            "translation": [0.0, 0.0, 0.0],
        }
        for name, bias in biases.items():
            final = getattr(head, f"flame_{name}_pred")[-1]
            final.weight.zero_()
            final.bias.copy_(torch.tensor(bias))
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def imported_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("vggheads_home")
    _rigged_checkpoint(home / "rigged.pth")
    import_vggheads(home / "rigged.pth", ImportOptions(root=home / "models"))
    return home


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _models(home: Path) -> ModelSet:
    def opener(name: str) -> OrtNetwork:
        return OrtNetwork(repository_network_path(name, home / "models"), name, 2, ["CPUExecutionProvider"])

    return ModelSet(opener=opener)


def test_unavailable_until_a_checkpoint_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path))
    reason = pipeline_missing_reason("vggheads")
    assert reason is not None and "headforge models import vggheads" in reason


def _run(home: Path, astronaut: NDArray[np.uint8], out: Path) -> dict:  # type: ignore[type-arg]
    options = ReconstructOptions(pipeline="vggheads", max_heads=3, texture_size=512, splats=500)
    return reconstruct_image(_png(astronaut), "astronaut.png", options, out, networks=_models(home))


def _check_heads(document: dict) -> None:  # type: ignore[type-arg]
    heads = document["heads"]
    assert len(heads) == 3  # 400 anchors fire; NMS and max_heads leave 3
    for head in heads:
        assert head["score"] == pytest.approx(1 / (1 + math.exp(-SCORE_BIAS)), abs=1e-5)
        for angle in ("yaw", "pitch", "roll"):
            assert head["pose"][angle] == pytest.approx(0.0, abs=1e-3)
        params = head["params"]
        assert params["model"] == "vggheads-flame"
        assert len(params["shape"]) == 300 and len(params["expression"]) == 100
        # astronaut.png is 512²: canvas = photo · 1.25, no padding; the anchor centre is an odd multiple of 16.
        tx, ty, tz = params["translation_px"]
        assert tz == 0.0
        for value in (tx, ty):
            remainder = (value * 1.25 - 16) % 32
            assert min(remainder, 32 - remainder) < 1e-3
        assert params["scale_px_per_m"] == pytest.approx(400 / 1.25, rel=1e-4)


def test_vggheads_without_flame(
    imported_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, astronaut: NDArray[np.uint8]
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(imported_home))
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(tmp_path / "absent.npz"))
    assert pipeline_missing_reason("vggheads") is None
    document = _run(imported_home, astronaut, tmp_path / "out")
    assert document["pipeline"] == "vggheads"
    _check_heads(document)
    assert all(head["mesh"] is None and head["splats"] == 0 for head in document["heads"])
    assert any("no FLAME model is imported" in note for note in document["notes"])
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    validate_result(written)
    assert [m["name"] for m in written["models"]] == ["vggheads"]
    assert written["models"][0]["version"].startswith("s-")


def test_vggheads_with_synthetic_flame(
    imported_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, astronaut: NDArray[np.uint8]
) -> None:
    _, asset = imported_synthetic_flame(tmp_path)
    monkeypatch.setenv("HEADFORGE_HOME", str(imported_home))
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset))
    out = tmp_path / "out"
    document = _run(imported_home, astronaut, out)
    _check_heads(document)
    for head in document["heads"]:
        assert head["mesh"] == {"topology": "flame5023", "vertices": 5023, "faces": 9976}
        assert head["splats"] > 0
        for kind in ("glb", "splats"):
            assert (out / head["artifacts"][kind]).is_file()
    assert not any("no FLAME model" in note for note in document["notes"])
    validate_result(json.loads((out / "result.json").read_text()))
    assert [m["name"] for m in document["models"]] == ["vggheads", "flame"]


class _FixedBatchNetwork:
    """A stand-in for a released graph exported with batch 1: refuses larger batches."""

    input_shape = (1, 3, 640, 640)

    def __init__(self) -> None:
        self.calls = 0

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        assert x.shape[0] == 1, "a fixed-batch graph takes one image"
        self.calls += 1
        boxes = np.tile(np.array([[100.0, 100.0, 200.0, 200.0]], np.float32), (1, 1000, 1))
        scores = np.zeros((1, 1000, 1), np.float32)
        scores[0, 0, 0] = 0.9
        flame = np.zeros((1, 1000, 413), np.float32)
        flame[..., pv.ROT_A1] = FRONTAL[:, 0]
        flame[..., pv.ROT_A2] = FRONTAL[:, 1]
        flame[..., pv.SCALE] = 500.0
        return [boxes, scores, flame]


def test_fixed_batch_graphs_run_one_photo_at_a_time(astronaut: NDArray[np.uint8]) -> None:
    network = _FixedBatchNetwork()
    found = pv.detect_batch(network, [astronaut, astronaut[:256]])
    assert network.calls == 2 and [len(heads) for heads in found] == [1, 1]
    assert found[0][0].box.tolist() == pytest.approx([80, 80, 160, 160])  # 512² photo: canvas = 1.25 × photo
