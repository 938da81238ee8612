"""The FLAME layer against a plain NumPy implementation of the same math, its gradients, its ONNX
export, and the fitter's restricted model against the layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flame_synthetic import imported_synthetic_flame

from headforge.models.flame import FlameConfig, FlameLayer, flame_export_spec, landmarks_from_vertices
from headforge.models.flame_import import FlameAsset, load_flame_asset


@pytest.fixture(scope="module")
def asset(tmp_path_factory: pytest.TempPathFactory) -> FlameAsset:
    return load_flame_asset(imported_synthetic_flame(tmp_path_factory.getbasetemp())[1])


def _rotation(axis_angle: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(axis_angle))
    if angle < 1e-12:
        return np.eye(3)
    k = axis_angle / angle
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew


def numpy_flame(
    asset: FlameAsset, shape: np.ndarray, expression: np.ndarray, pose: np.ndarray, translation: np.ndarray
) -> np.ndarray:
    """One head, written out joint by joint in float64: the reference for the layer."""
    ns, ne = len(shape), len(expression)
    v_shaped = asset.v_template + asset.shapedirs[:, :, :ns] @ shape + asset.exprdirs[:, :, :ne] @ expression
    joints = asset.j_regressor.astype(np.float64) @ v_shaped
    rotations = [_rotation(pose[3 * j : 3 * j + 3]) for j in range(5)]
    feature = np.concatenate([(r - np.eye(3)).ravel() for r in rotations[1:]])
    v_posed = v_shaped + asset.posedirs @ feature
    world: list[np.ndarray] = []
    for j, parent in enumerate(asset.parents):
        local = np.eye(4)
        local[:3, :3] = rotations[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0.0)
        world.append(local if parent < 0 else world[parent] @ local)
    skinning = []
    for j in range(5):
        relative = world[j].copy()
        relative[:3, 3] -= world[j][:3, :3] @ joints[j]
        skinning.append(relative)
    blended = np.einsum("vj,jab->vab", asset.weights.astype(np.float64), np.stack(skinning))
    homogeneous = np.concatenate([v_posed, np.ones((len(v_posed), 1))], axis=1)
    return np.einsum("vab,vb->va", blended, homogeneous)[:, :3] + translation


def _random_inputs(seed: int, batch: int, config: FlameConfig) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0, 1, (batch, config.num_shape)).astype(np.float32),
        rng.normal(0, 1, (batch, config.num_expression)).astype(np.float32),
        rng.normal(0, 0.3, (batch, 15)).astype(np.float32),
        rng.normal(0, 0.05, (batch, 3)).astype(np.float32),
    )


def test_layer_matches_numpy_reference(asset: FlameAsset) -> None:
    config = FlameConfig(num_shape=100, num_expression=50)
    layer = FlameLayer(asset, config)
    inputs = _random_inputs(0, 3, config)
    with torch.no_grad():
        got = layer(*(torch.from_numpy(x) for x in inputs)).numpy()
    assert got.shape == (3, 5023, 3)
    for head in range(3):
        expected = numpy_flame(asset, *(x[head].astype(np.float64) for x in inputs))
        # float32 layer vs float64 reference: sub-micrometer agreement on a 0.3 m head.
        assert np.abs(got[head] - expected).max() < 2e-6
    # The pose really moves vertices (so the comparison above is not of two rest meshes).
    shape, expression, _, translation = (x[0].astype(np.float64) for x in inputs)
    rest = numpy_flame(asset, shape, expression, np.zeros(15), translation)
    assert np.abs(got[0] - rest).max() > 1e-3


def test_layer_at_zero_is_the_template(asset: FlameAsset) -> None:
    layer = FlameLayer(asset)
    with torch.no_grad():
        vertices = layer(*layer.zero_parameters(2)).numpy()
    np.testing.assert_allclose(vertices[1], asset.v_template, atol=1e-6)


def test_layer_is_differentiable(asset: FlameAsset) -> None:
    config = FlameConfig(num_shape=20, num_expression=10)
    layer = FlameLayer(asset, config)
    parameters = [torch.tensor(x, requires_grad=True) for x in _random_inputs(1, 2, config)]
    layer(*parameters).square().sum().backward()
    for tensor in parameters:
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().max() > 0


def test_onnx_export_parity(asset: FlameAsset, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from headforge.export.onnx import export_onnx

    config = FlameConfig(num_shape=100, num_expression=50)
    layer = FlameLayer(asset, config)
    spec = flame_export_spec(config)
    result = export_onnx(layer, spec, tmp_path / "flame.onnx")
    assert result.max_rel_error <= spec.parity_tolerance
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        inputs = _random_inputs(10 + batch, batch, config)
        (vertices,) = session.run(["vertices"], {t.name: x for t, x in zip(spec.inputs, inputs, strict=True)})
        expected = numpy_flame(asset, *(x[-1].astype(np.float64) for x in inputs))
        assert vertices.shape == (batch, 5023, 3)
        assert np.abs(vertices[-1] - expected).max() < 5e-6


def test_fitting_model_matches_layer(asset: FlameAsset) -> None:
    """The fitter evaluates FLAME its own way (neck and eyes at rest); it must agree with the layer."""
    from headforge.pipeline.flame_fit import FlameLandmarkModel

    model = FlameLandmarkModel(asset)
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (2, 150))
    jaw = np.array([[0.2, 0.05, -0.03], [0.0, 0.0, 0.0]])
    pose = np.zeros((2, 15))
    pose[:, 6:9] = jaw
    layer = FlameLayer(asset)
    with torch.no_grad():
        vertices = layer(
            torch.tensor(z[:, :100], dtype=torch.float32),
            torch.tensor(z[:, 100:], dtype=torch.float32),
            torch.tensor(pose, dtype=torch.float32),
            torch.zeros(2, 3),
        )
        landmarks = landmarks_from_vertices(
            vertices,
            layer.faces,
            torch.from_numpy(asset.mp_face_idx.astype(np.int64)),  # type: ignore[union-attr]
            torch.from_numpy(asset.mp_bary),  # type: ignore[arg-type]
        )
    assert np.abs(model.vertices(z, jaw) - vertices.numpy()).max() < 2e-6
    assert np.abs(model.landmarks(z, jaw) - landmarks.numpy()).max() < 2e-6
