"""Head pose from landmarks: angle convention, synthetic recovery, AFLW2000 error, head frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from numpy.typing import NDArray

from headforge.errors import InvalidLandmarksError
from headforge.models.runtime import ModelSet
from headforge.pipeline.geometry import face_normals
from headforge.pipeline.pose import angles_to_rotation, estimate_pose, rotation_to_angles, to_head_frame
from headforge.pipeline.topology import build_image_mesh, load_topology

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Mean absolute error bound (degrees, over yaw, pitch and roll) for FaceMesh landmarks on the AFLW2000
# sample with label crops. Measured 5.28°; see docs/benchmarks.md. VGGHeads reports 3.76°.
LABEL_CROP_MAE_BOUND = 6.0
# The same error on the pipeline's own path (`find_heads`: tiled detection, detector ROI, one refine
# pass), all 8 faces found. Measured 7.08° with the ONNX models and 7.08° with LiteRT (they differ by
# 0.003°), so numerical noise is far below the 0.32° margin. That margin is 7.7° of extra error summed
# over the 24 angles (8 photos × yaw, pitch, roll): one angle of one photo 8° worse fails the test.
# Measured regressions: landmark depth halved gives 8.60°, a 1.6 × ROI 7.48°; the alternatives in
# docs/benchmarks.md move this figure by at most 0.35°. (Some ROI mistakes lower it by chance, e.g.
# 1.4 × gives 6.53°, so the ROI rule itself is pinned by tests/test_landmarks.py instead.)
DETECTOR_MAE_BOUND = 7.4
# With the labelled 3D landmarks themselves, only the template and the convention can be wrong.
LABEL_LANDMARK_MAE_BOUND = 1.5
# Renders of the astronaut's face at known angles (`bench/pose_error.py --synthetic`, no shared data
# needed): measured 4.23° mean absolute error, 25 of 27 renders found, yaw gain 0.70 (FaceMesh
# under-rotates turned heads; see docs/benchmarks.md). The gain floor catches a worse under-rotation.
SYNTHETIC_MAE_BOUND = 5.0
SYNTHETIC_MIN_FOUND = 23
SYNTHETIC_MIN_YAW_GAIN = 0.6


def _aflw_or_skip() -> Path:
    path = SHARED_DATA / "aflw2000-sample"
    if not path.is_dir():
        pytest.skip(f"shared test data not present: {path}")
    return path


@pytest.mark.parametrize(
    ("yaw", "pitch", "roll"),
    [
        (0.0, 0.0, 0.0),
        (30.0, 0.0, 0.0),
        (0.0, 25.0, 0.0),
        (0.0, 0.0, -20.0),
        (-55.0, 12.0, 8.0),
        (70.0, -30.0, 25.0),
    ],
)
def test_recovers_synthetic_rotations(yaw: float, pitch: float, roll: float) -> None:
    """Rotate, scale and move the template by known angles; the fit must give them back within 0.5°."""
    template = load_topology().template
    rotation = angles_to_rotation(yaw, pitch, roll)
    rng = np.random.default_rng(7)
    image_points = 900.0 * template @ rotation.T + [310.0, 240.0, 12.0]
    image_points += rng.normal(scale=0.5, size=image_points.shape)  # half-pixel landmark noise
    pose = estimate_pose(image_points)
    assert abs(pose.yaw - yaw) < 0.5 and abs(pose.pitch - pitch) < 0.5 and abs(pose.roll - roll) < 0.5
    assert pose.scale == pytest.approx(900.0, rel=0.01)


def test_angle_convention_round_trip_and_directions() -> None:
    rng = np.random.default_rng(3)
    for yaw, pitch, roll in rng.uniform([-80, -60, -60], [80, 60, 60], size=(50, 3)):
        assert np.allclose(
            rotation_to_angles(angles_to_rotation(yaw, pitch, roll)), (yaw, pitch, roll), atol=1e-6
        )
    template = load_topology().template
    nose_tip, chin, right_eye, left_eye = 1, 152, 33, 263
    # Positive yaw turns the face toward the image's left: the nose moves left of the face center.
    turned = template @ angles_to_rotation(30, 0, 0).T
    assert turned[nose_tip, 0] < turned[:, 0].mean() - 0.01
    # Positive pitch lifts the chin: it comes toward the camera (smaller image z).
    lifted = template @ angles_to_rotation(0, 20, 0).T
    assert lifted[chin, 2] < (template @ angles_to_rotation(0, 0, 0).T)[chin, 2] - 0.01
    # Positive roll turns the face clockwise in the image (y down): the subject's left eye (image right)
    # drops below the right eye.
    rolled = template @ angles_to_rotation(0, 0, 15).T
    assert rolled[left_eye, 1] > rolled[right_eye, 1] + 0.01


def test_label_landmarks_match_aflw_angles(repo_script: Callable[[str], ModuleType]) -> None:
    """Fitting the labelled 3D landmarks checks the template frame and the angle convention against
    AFLW2000's own poses, independent of any network."""
    bench = repo_script("bench/pose_error.py")
    samples = bench.label_landmark_poses(_aflw_or_skip())
    mae = bench.mean_absolute_error(samples)
    print(f"label landmarks MAE: {mae}")
    assert mae["found"] == len(samples) == 8
    assert mae["mean"] < LABEL_LANDMARK_MAE_BOUND
    for sample in samples:  # signs agree even at 70° yaw
        assert np.sign(sample.estimate[0]) == np.sign(sample.truth[0])


def _bench_on(
    repo_script: Callable[[str], ModuleType], networks: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> ModuleType:
    """bench/pose_error.py running on the `networks` fixture (the served ONNX models; the bench alone
    would fall back to LiteRT silently)."""
    bench = repo_script("bench/pose_error.py")
    monkeypatch.setattr(bench, "networks", lambda: networks)
    return bench


def test_pose_error_on_aflw2000_sample(
    repo_script: Callable[[str], ModuleType], networks: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FaceMesh landmarks (label crops, the usual AFLW2000 protocol) -> mean absolute error under a bound."""
    bench = _bench_on(repo_script, networks, monkeypatch)
    samples = bench.evaluate(_aflw_or_skip(), label_crops=True)
    mae = bench.mean_absolute_error(samples)
    print(f"FaceMesh landmarks MAE: {mae}")
    assert mae["found"] >= 7
    assert mae["mean"] < LABEL_CROP_MAE_BOUND


def test_pose_error_on_the_pipeline_path(
    repo_script: Callable[[str], ModuleType], networks: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Landmarks as `headforge reconstruct` gets them (`find_heads` on the whole photo, no labels
    used) -> mean absolute error under DETECTOR_MAE_BOUND, every face found."""
    bench = _bench_on(repo_script, networks, monkeypatch)
    samples = bench.evaluate(_aflw_or_skip(), label_crops=False)
    mae = bench.mean_absolute_error(samples)
    print(f"find_heads landmarks MAE: {mae}")
    assert mae["found"] == len(samples) == 8
    assert mae["mean"] < DETECTOR_MAE_BOUND


def test_pose_on_synthetic_renders(
    repo_script: Callable[[str], ModuleType], networks: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The astronaut's textured face rendered at known yaw and pitch: exact ground truth, no labels."""
    bench = _bench_on(repo_script, networks, monkeypatch)
    samples = bench.synthetic_poses()
    mae = bench.mean_absolute_error(samples)
    gain = bench.yaw_gain(samples)
    print(f"synthetic renders MAE: {mae}, yaw gain {gain:.2f}")
    assert mae["found"] >= SYNTHETIC_MIN_FOUND
    assert mae["mean"] < SYNTHETIC_MAE_BOUND
    assert SYNTHETIC_MIN_YAW_GAIN < gain < 1.1
    for sample in samples:
        if np.isfinite(sample.estimate).all() and abs(sample.truth[0]) >= 15:
            assert np.sign(sample.estimate[0]) == np.sign(sample.truth[0]), sample.name
        if np.isfinite(sample.estimate).all() and sample.truth[1] != 0:
            assert np.sign(sample.estimate[1]) == np.sign(sample.truth[1]), sample.name


def test_astronaut_pose_and_head_frame(astronaut_landmarks: NDArray[np.float32]) -> None:
    pose = estimate_pose(astronaut_landmarks)
    # She looks nearly at the camera.
    assert abs(pose.yaw) < 15 and abs(pose.pitch) < 20 and abs(pose.roll) < 15
    assert np.allclose(pose.rotation @ pose.rotation.T, np.eye(3), atol=1e-5)
    mesh = to_head_frame(build_image_mesh(astronaut_landmarks), pose)
    vertices = mesh.vertices
    width, height, _ = vertices.max(0) - vertices.min(0)
    assert 0.10 < width < 0.22 and 0.12 < height < 0.26, "head frame is in meters"
    assert np.abs(vertices.mean(0)).max() < 0.03, "centered at the head"
    assert vertices[10, 1] > vertices[1, 1] > vertices[152, 1], "+Y up"
    assert vertices[1, 2] > vertices[:, 2].mean() + 0.02, "face (nose) toward +Z"
    assert vertices[263, 0] > vertices[33, 0], "subject's left eye on +X (viewer's right)"
    # Winding survives the change of frame: faces are counter-clockwise seen from outside (+Z).
    assert (face_normals(vertices, mesh.faces)[:, 2] > 0).mean() > 0.95
    # The head-frame mesh is the template up to the person's own shape.
    assert np.sqrt(((vertices - load_topology().template) ** 2).sum(1).mean()) < 0.01


def test_rejects_bad_landmarks() -> None:
    with pytest.raises(InvalidLandmarksError):
        estimate_pose(np.zeros((10, 3)))
    with pytest.raises(InvalidLandmarksError):
        estimate_pose(np.full((468, 3), np.nan))
    with pytest.raises(InvalidLandmarksError):
        estimate_pose(np.ones((468, 3)))
