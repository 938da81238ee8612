"""Texture unwrapping: real photo colors land on the right texels, nothing inside the islands stays
unfilled, seams (uv_faces) and mirror fill work."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from headforge.errors import InvalidOptionError
from headforge.pipeline.geometry import cached_uv_raster, vertex_normals
from headforge.pipeline.pose import angles_to_rotation
from headforge.pipeline.texture import unwrap_texture
from headforge.pipeline.topology import build_image_mesh, load_topology
from headforge.pipeline.types import Mesh


@pytest.fixture(scope="module")
def astronaut_mesh(astronaut_landmarks: NDArray[np.float32]) -> Mesh:
    return build_image_mesh(astronaut_landmarks)


def seamed(mesh: Mesh) -> Mesh:
    """The face mesh with a real UV seam down the midline: triangles left of it keep their UVs squeezed
    into the left third of the square, the others into the right third (`uv_faces` indexes them)."""
    uvs = np.asarray(mesh.uvs, dtype=np.float64)
    faces = np.asarray(mesh.faces)
    right = uvs[faces].mean(1)[:, 0] >= 0.5
    left_uvs = uvs * [0.5, 1.0]
    right_uvs = uvs * [0.5, 1.0] + [0.5, 0.0]
    uv_faces = np.where(right[:, None], faces + len(uvs), faces).astype(np.int32)
    return Mesh(
        mesh.vertices,
        mesh.faces,
        np.concatenate([left_uvs, right_uvs]).astype(np.float32),
        uv_faces,
        "seamed",
    )


def texels_at_uv(texture: NDArray[np.uint8], uv: NDArray[np.floating]) -> NDArray[np.float64]:
    size = texture.shape[0]
    col = np.clip((uv[:, 0] * size).astype(int), 0, size - 1)
    row = np.clip(((1.0 - uv[:, 1]) * size).astype(int), 0, size - 1)
    return texture[row, col].astype(np.float64)


def frontal_vertices(mesh: Mesh) -> NDArray[np.int64]:
    """Vertices whose surface faces the camera squarely (image frame: camera looks along +z)."""
    normals = vertex_normals(mesh.vertices, mesh.faces)
    return np.flatnonzero(-normals[:, 2] > 0.8)


def test_colors_come_from_the_photo(astronaut: NDArray[np.uint8], astronaut_mesh: Mesh) -> None:
    texture, coverage = unwrap_texture(astronaut, astronaut_mesh, 1024, symmetry=load_topology().mirror)
    assert texture.shape == (1024, 1024, 3) and texture.dtype == np.uint8
    assert coverage.shape == (1024, 1024) and coverage.dtype == bool
    # Per vertex: the texel at its UV has the photo's color at its projected position (both slightly
    # blurred, as landmarks sit on edges such as eyelids).
    import cv2

    blurred_photo = cv2.GaussianBlur(astronaut, (5, 5), 1.5).astype(np.float64)
    blurred_texture = cv2.GaussianBlur(texture, (9, 9), 3.0)
    front = frontal_vertices(astronaut_mesh)
    assert len(front) > 150
    xy = astronaut_mesh.vertices[front, :2]
    photo = blurred_photo[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    unwrapped = texels_at_uv(blurred_texture, astronaut_mesh.uvs[front])
    difference = np.abs(photo - unwrapped).max(1)
    assert np.median(difference) < 8 and np.percentile(difference, 90) < 25
    # Mean skin color over the texture's face region matches the photo's face region.
    raster = cached_uv_raster(astronaut_mesh.uvs, astronaut_mesh.faces, 1024)
    mask = np.zeros(astronaut.shape[:2], np.uint8)
    hull = cv2.convexHull(astronaut_mesh.vertices[:, :2].astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1)
    photo_mean = astronaut[mask > 0].mean(0)
    texture_mean = texture[raster.island_mask & coverage].mean(0)
    assert np.abs(photo_mean - texture_mean).max() < 15


def test_no_unfilled_texel_inside_islands(astronaut_mesh: Mesh) -> None:
    """A photo of one flat color: every texel, inside the islands (sampled, mirrored or inpainted) and
    outside them (dilated), must come out that color; an unfilled texel would stay black."""
    color = np.array([201, 97, 43], np.uint8)
    photo = np.broadcast_to(color, (512, 512, 3)).copy()
    for symmetry in (load_topology().mirror, None):
        texture, coverage = unwrap_texture(photo, astronaut_mesh, 512, symmetry=symmetry)
        assert 0.2 < coverage.mean() < 0.6
        assert (np.abs(texture.astype(int) - color).max(2) <= 1).all()


def test_face_cut_by_the_photo_border(astronaut_mesh: Mesh) -> None:
    """Half the face lies left of the photo: nothing may be sampled from outside it (that would read
    black), and the missing half is mirrored or inpainted."""
    color = np.array([40, 180, 90], np.uint8)
    photo = np.broadcast_to(color, (512, 512, 3)).copy()
    vertices = astronaut_mesh.vertices.copy()
    vertices[:, 0] -= vertices[:, 0].mean()  # the face's midline on the photo's left edge
    mesh = Mesh(vertices, astronaut_mesh.faces, astronaut_mesh.uvs)
    for symmetry, most in ((load_topology().mirror, 0.5), (None, 0.3)):
        texture, coverage = unwrap_texture(photo, mesh, 512, symmetry=symmetry)
        assert 0.05 < coverage.mean() < most
        assert (np.abs(texture.astype(int) - color).max(2) <= 1).all()
    _, half = unwrap_texture(photo, mesh, 512)
    # Only the half right of the photo's edge is seen: the subject's left, u > 0.5 in the layout.
    assert half[:, :212].sum() < 0.05 * half[:, 300:].sum()


def test_mirror_fills_the_side_the_camera_cannot_see(
    astronaut: NDArray[np.uint8], astronaut_mesh: Mesh
) -> None:
    """Turn the mesh 60° about its center: the far side leaves the camera's view; with the mirror map its
    texels are colored from the near side instead of being inpainted."""
    vertices = astronaut_mesh.vertices.astype(np.float64)
    center = vertices.mean(0)
    turned = (vertices - center) @ angles_to_rotation(60.0, 0.0, 0.0).T + center
    mesh = Mesh(turned.astype(np.float32), astronaut_mesh.faces, astronaut_mesh.uvs)
    mirror = load_topology().mirror
    _, without = unwrap_texture(astronaut, mesh, 512)
    texture, with_mirror = unwrap_texture(astronaut, mesh, 512, symmetry=mirror)
    raster = cached_uv_raster(mesh.uvs, mesh.faces, 512)
    islands = raster.island_mask.sum()
    assert without.sum() < 0.8 * islands
    assert with_mirror.sum() > without.sum() + 0.15 * islands
    assert not (without & ~with_mirror).any()
    # A mirrored texel carries the color of its mirror texel (reflected across the layout's midline).
    gained = with_mirror & ~without
    rows, cols = np.nonzero(gained)
    mirrored_cols = 511 - cols
    keep = without[rows, mirrored_cols]
    difference = np.abs(
        texture[rows[keep], cols[keep]].astype(int) - texture[rows[keep], mirrored_cols[keep]]
    ).max(1)
    assert keep.mean() > 0.5 and np.median(difference) < 12


def test_works_on_meshes_with_uv_seams(astronaut: NDArray[np.uint8], astronaut_mesh: Mesh) -> None:
    mesh = seamed(astronaut_mesh)
    texture, coverage = unwrap_texture(astronaut, mesh, 512)
    plain, _ = unwrap_texture(astronaut, astronaut_mesh, 512)
    front = frontal_vertices(astronaut_mesh)
    # The same vertex, through either layout, gets nearly the same color.
    left = np.asarray(mesh.uv_faces)[np.isin(np.asarray(mesh.uv_faces), front)]
    uv_of_vertex = {}
    for face, uv_face in zip(
        np.asarray(mesh.faces).tolist(), np.asarray(mesh.uv_faces).tolist(), strict=True
    ):
        for vertex, uv_index in zip(face, uv_face, strict=True):
            uv_of_vertex.setdefault(vertex, uv_index)
    seam_uvs = mesh.uvs[[uv_of_vertex[v] for v in front]]
    difference = np.abs(texels_at_uv(texture, seam_uvs) - texels_at_uv(plain, astronaut_mesh.uvs[front])).max(
        1
    )
    assert len(left) > 0 and np.median(difference) < 10
    # Both islands are covered, and the gap between them is filled by dilation (no black).
    assert coverage[:, :150].any() and coverage[:, 362:].any() and not coverage[:, 260].any()
    assert texture[:, 250:262].min() > 0


@pytest.mark.parametrize("size", [512, 4096])
def test_supported_sizes(astronaut: NDArray[np.uint8], astronaut_mesh: Mesh, size: int) -> None:
    texture, coverage = unwrap_texture(astronaut, astronaut_mesh, size, symmetry=load_topology().mirror)
    assert texture.shape == (size, size, 3) and coverage.shape == (size, size)
    assert coverage.mean() > 0.3


@pytest.mark.parametrize("size", [256, 8192, 1000.5, True])
def test_rejects_unsupported_sizes(astronaut: NDArray[np.uint8], astronaut_mesh: Mesh, size: object) -> None:
    with pytest.raises(InvalidOptionError) as error:
        unwrap_texture(astronaut, astronaut_mesh, size)  # type: ignore[arg-type]
    assert error.value.code == "invalid_option"


def test_rejects_bad_inputs(astronaut: NDArray[np.uint8], astronaut_mesh: Mesh) -> None:
    with pytest.raises(InvalidOptionError):
        unwrap_texture(astronaut[..., 0], astronaut_mesh, 512)
    with pytest.raises(InvalidOptionError):
        unwrap_texture(astronaut, astronaut_mesh, 512, symmetry=np.arange(10))
