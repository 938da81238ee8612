"""Animation: FLAME expression morph targets in the GLB (validator + a vertex moved by a known weight),
splats bound to the mesh staying bound under an expression, the binding file, expression sequences
and their bad input. Synthetic FLAME at FLAME's real sizes (tests/flame_synthetic.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame

from headforge.errors import InvalidOptionError
from headforge.models.flame_import import load_flame_asset
from headforge.pipeline.animate import check_expressions, flame_morph_targets, parse_sequence
from headforge.pipeline.flame_fit import FlameFit, FlameLandmarkModel, rodrigues
from headforge.pipeline.package import encode_png, glb_bytes, split_uv_seams, write_head_files
from headforge.pipeline.rig import (
    JAW_OPEN_RAD,
    SplatDeformer,
    bind_splats,
    matrix_to_quaternion,
    quaternion_to_matrix,
    read_binding,
)
from headforge.pipeline.splats import sample_splats
from headforge.pipeline.types import Mesh


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> FlameLandmarkModel:
    return FlameLandmarkModel(load_flame_asset(imported_synthetic_flame(tmp_path_factory.getbasetemp())[1]))


@pytest.fixture(scope="module")
def fit(model: FlameLandmarkModel) -> FlameFit:
    """A head with its own identity, a fitted expression and a slightly open jaw."""
    rng = np.random.default_rng(3)
    return FlameFit(
        shape=rng.normal(0, 1, model.num_shape),
        expression=rng.normal(0, 0.5, model.num_expression),
        jaw_pose=np.array([0.12, 0.02, -0.01]),
        rotation=np.eye(3),
        translation=np.zeros(3),
        scale=1000.0,
        residual_px=0.0,
        iterations=0,
    )


def _vertices(
    model: FlameLandmarkModel, fit: FlameFit, expression: np.ndarray, jaw: np.ndarray
) -> np.ndarray:
    z = np.concatenate([fit.shape, expression])[None]
    return model.vertices(z, np.asarray(jaw, np.float64)[None])[0]


def _head_mesh(model: FlameLandmarkModel, fit: FlameFit, expressions: int = 16) -> Mesh:
    asset = model.asset
    assert asset.uvs is not None and asset.uv_faces is not None
    mesh = Mesh(
        vertices=_vertices(model, fit, fit.expression, fit.jaw_pose).astype(np.float32),
        faces=asset.faces,
        uvs=asset.uvs,
        uv_faces=asset.uv_faces,
        topology="flame5023",
    )
    mesh.morph_targets = flame_morph_targets(model, fit, expressions)
    return mesh


def _read_glb(data: bytes) -> tuple[dict[str, Any], bytes]:
    json_length = struct.unpack_from("<I", data, 12)[0]
    tree = json.loads(data[20 : 20 + json_length])
    offset = 20 + json_length
    bin_length = struct.unpack_from("<I", data, offset)[0]
    return tree, data[offset + 8 : offset + 8 + bin_length]


def _accessor(tree: dict[str, Any], binary: bytes, index: int) -> np.ndarray:
    accessor = tree["accessors"][index]
    view = tree["bufferViews"][accessor["bufferView"]]
    assert accessor["componentType"] == 5126 and accessor["type"] == "VEC3"
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    return np.frombuffer(binary, "<f4", accessor["count"] * 3, start).reshape(-1, 3)


def test_morph_targets_in_the_glb_move_a_vertex_by_a_known_weight(
    model: FlameLandmarkModel, fit: FlameFit, tmp_path: Path
) -> None:
    mesh = _head_mesh(model, fit)
    texture = np.full((64, 64, 3), 180, np.uint8)
    data = glb_bytes(mesh, encode_png(texture), "h0")
    (tmp_path / "h0.glb").write_bytes(data)
    tree, binary = _read_glb(data)
    (gltf_mesh,) = tree["meshes"]
    (primitive,) = gltf_mesh["primitives"]
    names = gltf_mesh["extras"]["targetNames"]
    assert names == [f"expression_{k}" for k in range(16)] + ["jaw_open"]
    assert len(primitive["targets"]) == 17 and gltf_mesh["weights"] == [0.0] * 17
    _, _, _, source = split_uv_seams(mesh)
    base = _accessor(tree, binary, primitive["attributes"]["POSITION"])
    np.testing.assert_allclose(base, mesh.vertices[source], atol=1e-6)

    # Expression target 5 at weight 0.7: the GLB's vertex lands where FLAME puts it with ψ_5 + 0.7.
    delta = _accessor(tree, binary, primitive["targets"][5]["POSITION"])
    vertex = int(np.argmax(np.linalg.norm(delta, axis=1)))
    assert np.linalg.norm(delta[vertex]) > 1e-4  # the target does move this vertex
    expression = fit.expression.copy()
    expression[5] += 0.7
    truth = _vertices(model, fit, expression, fit.jaw_pose)[source]
    np.testing.assert_allclose(base[vertex] + 0.7 * delta[vertex], truth[vertex], atol=1e-5)
    # Weights combine: FLAME is affine in ψ at a fixed jaw, so two targets at once are exact too.
    other = _accessor(tree, binary, primitive["targets"][2]["POSITION"])
    expression[2] -= 1.3
    truth = _vertices(model, fit, expression, fit.jaw_pose)[source]
    np.testing.assert_allclose(base + 0.7 * delta - 1.3 * other, truth, atol=1e-5)
    # jaw_open at weight 1 opens the jaw by JAW_OPEN_RAD.
    jaw = _accessor(tree, binary, primitive["targets"][16]["POSITION"])
    opened = _vertices(model, fit, fit.expression, fit.jaw_pose + np.array([JAW_OPEN_RAD, 0, 0]))[source]
    np.testing.assert_allclose(base + jaw, opened, atol=1e-5)

    from gltf_validator import validate_gltf

    (report,) = validate_gltf(tmp_path / "h0.glb")
    assert report["numErrors"] == 0, report


def test_expressions_option_bounds() -> None:
    assert check_expressions(16) == 16
    for bad in (0, 51, 2.5, True, "16"):
        with pytest.raises(InvalidOptionError) as caught:
            check_expressions(bad)
        assert caught.value.http_status == 422


def test_quaternion_conversions_round_trip() -> None:
    rng = np.random.default_rng(0)
    matrices = rodrigues(rng.normal(0, 1.5, (500, 3)))
    matrices[:3] = [np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])]  # w = 0 cases
    np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(matrices)), matrices, atol=1e-12)


def test_splats_stay_bound_under_an_expression(model: FlameLandmarkModel, fit: FlameFit) -> None:
    mesh = _head_mesh(model, fit)
    splats = sample_splats(mesh, np.full((64, 64, 3), 200, np.uint8), count=3000, seed=1)
    assert splats.binding is not None
    faces = np.asarray(mesh.faces, np.int64)
    # Lift the splats off the surface by known offsets and turn them, then bind them again.
    rng = np.random.default_rng(5)
    lift = rng.uniform(-0.004, 0.004, len(splats.means))
    binding = bind_splats(
        mesh.vertices,
        faces,
        splats.binding.triangles,
        splats.binding.barycentrics,
        splats.means + lift[:, None] * splats.normals,
        matrix_to_quaternion(rodrigues(rng.normal(0, 1, (len(lift), 3)))),
        splats.scales,
    )
    np.testing.assert_allclose(binding.offsets, lift, atol=1e-6)
    deformer = SplatDeformer(binding, faces)

    # An expression and an open jaw move the mesh by millimetres to centimetres.
    expression = np.zeros(model.num_expression)
    expression[:16] = rng.normal(0, 1.5, 16)
    posed_vertices = _vertices(model, fit, expression, np.array([0.3, 0.0, 0.0]))
    assert np.linalg.norm(posed_vertices - mesh.vertices, axis=1).max() > 0.005
    posed = deformer.pose(posed_vertices.astype(np.float32))
    # Independently (float64): project each centre onto its deformed triangle's plane.
    corners = posed_vertices[faces[binding.triangles]]
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    normal = np.cross(e1, e2)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    relative = np.asarray(posed.means, np.float64) - corners[:, 0]
    offset = np.einsum("nc,nc->n", relative, normal)
    np.testing.assert_allclose(offset, binding.offsets, atol=1e-5)
    in_plane = relative - offset[:, None] * normal
    basis = np.stack([e1, e2], axis=2)  # (N, 3, 2)
    solved = np.linalg.lstsq(basis[0], in_plane[0], rcond=None)[0]  # one row by hand
    np.testing.assert_allclose(solved, binding.barycentrics[0, 1:], atol=1e-4)
    expected = corners[:, 0] + np.einsum("nck,nk->nc", basis, binding.barycentrics[:, 1:].astype(np.float64))
    np.testing.assert_allclose(in_plane + corners[:, 0], expected, atol=1e-5)
    # Rotations turn with the triangle: the splat's local frame is unchanged in the triangle's frame.
    world = quaternion_to_matrix(np.asarray(posed.rotations, np.float64))
    tangent = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    frame = np.stack([tangent, np.cross(normal, tangent), normal], axis=2)
    local = np.einsum("nji,njk->nik", frame, world)
    np.testing.assert_allclose(local, quaternion_to_matrix(binding.rotations.astype(np.float64)), atol=1e-4)

    # At rest the binding gives back the splats it was made from.
    rest = SplatDeformer(splats.binding, faces).pose(mesh.vertices)
    np.testing.assert_allclose(rest.means, splats.means, atol=1e-6)
    np.testing.assert_allclose(rest.scales, splats.scales, rtol=1e-4)
    np.testing.assert_allclose(
        quaternion_to_matrix(rest.rotations), quaternion_to_matrix(splats.rotations), atol=1e-4
    )


def test_binding_file_beside_the_ply(model: FlameLandmarkModel, fit: FlameFit, tmp_path: Path) -> None:
    mesh = _head_mesh(model, fit)
    splats = sample_splats(mesh, np.full((64, 64, 3), 200, np.uint8), count=500, seed=2)
    written = write_head_files(mesh, None, splats, "h0", tmp_path, {"glb", "splats"})
    assert {file.name: file.kind for file in written} == {
        "h0.glb": "glb",
        "h0_splats.ply": "splats",
        "h0_splats_binding.npz": "binding",
    }
    assert splats.binding is not None
    binding, faces, vertex_count = read_binding((tmp_path / "h0_splats_binding.npz").read_bytes())
    assert vertex_count == 5023 and np.array_equal(faces, mesh.faces)
    np.testing.assert_array_equal(binding.triangles, splats.binding.triangles)
    np.testing.assert_array_equal(binding.barycentrics, splats.binding.barycentrics)
    for broken in (b"not a zip", (tmp_path / "h0.glb").read_bytes()):
        with pytest.raises(ValueError, match="splat binding"):
            read_binding(broken)
    # Heads without morph targets (facemesh) get no binding file.
    mesh.morph_targets = None
    written = write_head_files(mesh, None, splats, "h1", tmp_path, {"splats"})
    assert [file.name for file in written] == ["h1_splats.ply"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"frames": [{"expression": [0.0] * 15}]}, "array of 16 numbers, got 15"),
        ({"frames": [{"expression": [0.0] * 16}, {"expression": [0.0] * 17}]}, "frame 1 expression"),
        ({"frames": [{"expression": [0.0] * 16, "jaw": [0.1]}]}, "frame 0 jaw must be an array of 3"),
        ({"frames": [{"expression": "smile"}]}, "got str"),
        ({"frames": [{"expression": [None] * 16}]}, "finite numbers"),
        ({"frames": [{"expression": [0.0] * 16, "pose": [0, 0, 0]}]}, "unknown keys"),
        ({"frames": []}, "has no frames"),
        ({"frames": [{"expression": [0.0] * 16}], "loop": True}, "unknown keys"),
        ([{"expression": [0.0] * 16}], 'object with a "frames" list'),
        ({"fps": 0, "frames": [{"expression": [0.0] * 16}]}, "fps"),
    ],
)
def test_bad_expression_sequences_are_refused(document: object, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message) as caught:
        parse_sequence(document, 16)
    assert caught.value.http_status == 422 and caught.value.code == "invalid_sequence"


def test_too_many_frames_is_413() -> None:
    from headforge.errors import TooManyFramesError

    document = {"frames": [{"expression": [0.0] * 16}] * 4}
    assert len(parse_sequence(document, 16, max_frames=4).expression) == 4
    with pytest.raises(TooManyFramesError, match="over the limit of 3") as caught:
        parse_sequence(document, 16, max_frames=3)
    assert caught.value.http_status == 413 and caught.value.code == "too_many_frames"


def test_expression_sequence_parses() -> None:
    sequence = parse_sequence(
        {"fps": 24, "frames": [{"expression": [0.5] * 16}, {"expression": [0] * 16, "jaw": [0.2, 0, 0]}]}, 16
    )
    assert sequence.expression.shape == (2, 16) and sequence.fps == 24
    np.testing.assert_array_equal(sequence.jaw, [[0, 0, 0], [0.2, 0, 0]])


def test_flame_driver_matches_the_full_model(model: FlameLandmarkModel, fit: FlameFit) -> None:
    from headforge.pipeline.animate import FlameDriver

    rng = np.random.default_rng(11)
    expression = rng.normal(0, 1.5, (4, 16))
    jaw = np.c_[rng.uniform(0, 0.3, 4), rng.normal(0, 0.05, (4, 2))]
    z = np.zeros((4, model.num_linear))
    z[:, : model.num_shape] = fit.shape
    z[:, model.num_shape : model.num_shape + 16] = expression
    driven = FlameDriver(model, fit.shape, 16).vertices(expression, jaw)
    np.testing.assert_allclose(driven, model.vertices(z, jaw), atol=2e-6)


def test_animation_benchmark_runs_and_both_paths_agree() -> None:
    from headforge.benchmarks.animation import run

    report = run(quick=True, splats=512, batch=4)
    assert report["animation_fps"] > 0 and report["animation_fps_reference"] > 0
    ratio = report["animation_fps"] / report["animation_fps_reference"]  # of the rounded fps figures
    assert report["animation_speedup"] == pytest.approx(ratio, rel=0.01)
    assert report["animation_parity_vertices_m"] < 1e-6 and report["animation_parity_means_m"] < 1e-6
    assert report["animation_parity_rotation"] < 1e-5 and report["animation_parity_scales"] < 1e-6
