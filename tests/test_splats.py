"""Splat sampling math: area weighting, surface-aligned frames, scales, colors, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation
from scipy.stats import chisquare

from headforge.errors import InvalidOptionError
from headforge.pipeline.geometry import face_normals, triangle_areas
from headforge.pipeline.pose import estimate_pose, to_head_frame
from headforge.pipeline.splats import sample_splats, sample_surface
from headforge.pipeline.texture import unwrap_texture
from headforge.pipeline.topology import build_image_mesh, load_topology
from headforge.pipeline.types import Mesh


@pytest.fixture(scope="module")
def astronaut_head(
    astronaut: NDArray[np.uint8], astronaut_landmarks: NDArray[np.float32]
) -> tuple[Mesh, NDArray[np.uint8]]:
    """The astronaut's face mesh in the head frame and its texture, from the real pipeline stages."""
    mesh_image = build_image_mesh(astronaut_landmarks)
    texture, _ = unwrap_texture(astronaut, mesh_image, 512, symmetry=load_topology().mirror)
    return to_head_frame(mesh_image, estimate_pose(mesh_image.vertices)), texture


def two_triangles() -> Mesh:
    """Areas 1 and 3 (in the z = 0 plane), UVs on the left and right halves of the square."""
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [2, 0, 0], [5, 0, 0], [2, 2, 0]], np.float32)
    faces = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    uvs = np.array([[0.1, 0.1], [0.4, 0.1], [0.1, 0.9], [0.6, 0.1], [0.9, 0.1], [0.6, 0.9]], np.float32)
    return Mesh(vertices, faces, uvs, topology="test")


def test_quaternions_are_unit_and_match_triangle_frames(
    astronaut_head: tuple[Mesh, NDArray[np.uint8]],
) -> None:
    mesh, texture = astronaut_head
    splats = sample_splats(mesh, texture, 8192, seed=1)
    assert splats.rotations.shape == (8192, 4)
    assert np.allclose(np.linalg.norm(splats.rotations, axis=1), 1.0, atol=1e-5)
    assert (splats.rotations[:, 0] >= 0).all()  # w first, canonical sign
    triangles, _, _ = sample_surface(mesh, 8192, seed=1)
    expected_normals = face_normals(mesh.vertices, mesh.faces)[triangles]
    assert np.allclose(splats.normals, expected_normals, atol=1e-5)
    # The quaternion's third axis is the normal; its first axis lies in the triangle's plane.
    xyzw = np.concatenate([splats.rotations[:, 1:], splats.rotations[:, :1]], axis=1)
    matrices = Rotation.from_quat(xyzw).as_matrix()
    assert np.allclose(matrices[:, :, 2], expected_normals, atol=1e-4)
    assert np.abs((matrices[:, :, 0] * expected_normals).sum(1)).max() < 1e-4
    # Normals point outward: away from a point well behind the face (head frame: face toward +Z).
    inside_head = mesh.vertices.mean(0) - [0.0, 0.0, 0.08]
    assert ((splats.normals * (splats.means - inside_head)).sum(1) > 0).mean() > 0.99
    assert (splats.normals[:, 2] > 0).mean() > 0.85


def test_means_lie_on_their_triangles(astronaut_head: tuple[Mesh, NDArray[np.uint8]]) -> None:
    mesh, texture = astronaut_head
    splats = sample_splats(mesh, texture, 4096, seed=2)
    triangles, bary, _ = sample_surface(mesh, 4096, seed=2)
    assert (bary >= 0).all() and np.allclose(bary.sum(1), 1.0)
    corner = mesh.vertices[mesh.faces[triangles, 0]]
    distance_to_plane = np.abs(((splats.means - corner) * splats.normals).sum(1))
    assert distance_to_plane.max() < 1e-6
    assert np.allclose(bary.mean(0), 1 / 3, atol=0.01)  # uniform inside each triangle


def test_deterministic_per_seed(astronaut_head: tuple[Mesh, NDArray[np.uint8]]) -> None:
    mesh, texture = astronaut_head
    first = sample_splats(mesh, texture, 2048, seed=5)
    again = sample_splats(mesh, texture, 2048, seed=5)
    other = sample_splats(mesh, texture, 2048, seed=6)
    for name in ("means", "normals", "colors", "opacities", "scales", "rotations"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert not np.allclose(first.means, other.means)


def test_area_weighting() -> None:
    mesh = two_triangles()
    triangles, _, _ = sample_surface(mesh, 40_000, seed=0)
    share = (triangles == 1).mean()
    assert abs(share - 0.75) < 0.011  # 5 binomial standard deviations


def test_area_weighting_on_the_face_mesh() -> None:
    template = load_topology()
    mesh = Mesh(template.template.astype(np.float32), template.faces, template.uvs)
    count = 200_000
    triangles, _, _ = sample_surface(mesh, count, seed=3)
    observed = np.bincount(triangles, minlength=len(mesh.faces))
    areas = triangle_areas(mesh.vertices, mesh.faces)
    expected = count * areas / areas.sum()
    assert chisquare(observed, expected).pvalue > 1e-4


def test_scales_follow_sampling_density(astronaut_head: tuple[Mesh, NDArray[np.uint8]]) -> None:
    mesh, texture = astronaut_head
    area = triangle_areas(mesh.vertices, mesh.faces).sum()
    for count in (2048, 8192):
        splats = sample_splats(mesh, texture, count, seed=0)
        tangent = splats.scales[:, :2]
        assert np.array_equal(tangent[:, 0], tangent[:, 1])
        assert (splats.scales[:, 2] < 0.01 * tangent[:, 0]).all() and (splats.scales[:, 2] > 0).all()
        spacing = np.sqrt(area / count)
        assert 0.3 * spacing < np.median(tangent) < 1.0 * spacing
    # Four times the splats: half the scale.
    ratio = np.median(sample_splats(mesh, texture, 2048, seed=0).scales[:, 0]) / np.median(
        sample_splats(mesh, texture, 8192, seed=0).scales[:, 0]
    )
    assert 1.7 < ratio < 2.3


def test_colors_come_from_the_texture_through_uvs() -> None:
    mesh = two_triangles()
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:, :32] = (255, 0, 0)
    texture[:, 32:] = (0, 0, 255)
    splats = sample_splats(mesh, texture, 1000, seed=0, opacity=0.8)
    on_right = splats.means[:, 0] >= 2
    assert np.allclose(splats.colors[~on_right], [1, 0, 0], atol=1e-6)
    assert np.allclose(splats.colors[on_right], [0, 0, 1], atol=1e-6)
    assert np.allclose(splats.opacities, 0.8)
    # The same through split UVs (uv_faces), as on FLAME.
    seamed = Mesh(
        mesh.vertices, mesh.faces, mesh.uvs[[3, 4, 5, 0, 1, 2]], np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    )
    swapped = sample_splats(seamed, texture, 1000, seed=0)
    assert np.allclose(swapped.colors[~on_right], [0, 0, 1], atol=1e-6)


def test_large_counts_are_colored_too() -> None:
    """More samples than OpenCV's remap takes in one row (32767) still get their texture colors."""
    mesh = two_triangles()
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:, :32] = (255, 0, 0)
    texture[:, 32:] = (0, 0, 255)
    splats = sample_splats(mesh, texture, 40_000, seed=1)
    on_right = splats.means[:, 0] >= 2
    assert len(splats.colors) == 40_000
    assert np.allclose(splats.colors[~on_right], [1, 0, 0], atol=1e-6)
    assert np.allclose(splats.colors[on_right], [0, 0, 1], atol=1e-6)


def test_colors_match_the_face_texture(astronaut_head: tuple[Mesh, NDArray[np.uint8]]) -> None:
    mesh, texture = astronaut_head
    splats = sample_splats(mesh, texture, 8192, seed=0)
    assert splats.colors.min() >= 0 and splats.colors.max() <= 1
    # Skin: red above green above blue, on average.
    red, green, blue = splats.colors.mean(0)
    assert red > green > blue and red > 0.45


@pytest.mark.parametrize("count", [0, -5, 2_000_000, 10.5])
def test_rejects_bad_counts(count: object) -> None:
    with pytest.raises(InvalidOptionError):
        sample_splats(two_triangles(), np.zeros((8, 8, 3), np.uint8), count)  # type: ignore[arg-type]


def test_rejects_meshes_without_area() -> None:
    flat = two_triangles()
    flat.vertices[:] = 0
    with pytest.raises(InvalidOptionError):
        sample_splats(flat, np.zeros((8, 8, 3), np.uint8), 10)
