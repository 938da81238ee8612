"""Package stage on synthetic meshes: GLB (Khronos validator, trimesh round trip), OBJ + MTL + PNG,
the 3DGS PLY layout read back with plyfile, atomic writes, and the preview renderer."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import trimesh
from gltf_validator import validate_gltf
from PIL import Image
from plyfile import PlyData
from skimage import data

from headforge.pipeline.package import (
    SH_C0,
    SPLAT_PLY_PROPERTIES,
    encode_png,
    glb_bytes,
    obj_files,
    splats_ply_bytes,
    split_uv_seams,
    write_atomic,
    write_head_files,
)
from headforge.pipeline.preview import compose_preview, rasterize, render_textured
from headforge.pipeline.types import Detection, Head, Mesh, Splats


def hemisphere_mesh(subdivisions: int = 3, radius: float = 0.1) -> Mesh:
    """The front half of an icosphere (+Z), CCW from outside, UVs from a frontal projection."""
    sphere = trimesh.creation.icosphere(subdivisions, radius=radius)
    front = sphere.vertices[sphere.faces].mean(axis=1)[:, 2] > 0
    part = sphere.submesh([np.flatnonzero(front)], append=True)
    vertices = np.asarray(part.vertices, dtype=np.float32)
    uvs = (vertices[:, :2] / (2 * radius) + 0.5).astype(np.float32)
    return Mesh(vertices=vertices, faces=np.asarray(part.faces, dtype=np.int32), uvs=uvs)


def seamed_mesh() -> Mesh:
    """A quad whose two triangles use separate UV islands: per-face UVs through `uv_faces`."""
    vertices = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    uvs = np.array([[0, 0], [0.5, 0], [0.5, 0.5], [0.5, 0.5], [1, 0.5], [1, 1]], dtype=np.float32)
    uv_faces = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int32)
    return Mesh(vertices=vertices, faces=faces, uvs=uvs, uv_faces=uv_faces)


def face_texture(size: int = 256) -> np.ndarray:
    photo = data.astronaut()[30:230, 160:360]
    return np.ascontiguousarray(cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA))


def random_splats(count: int, seed: int = 0) -> Splats:
    rng = np.random.default_rng(seed)
    quats = rng.normal(size=(count, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    normals = rng.normal(size=(count, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    scales = np.column_stack(
        [rng.uniform(1e-3, 5e-3, count), rng.uniform(1e-3, 5e-3, count), np.full(count, 1e-7)]
    )
    return Splats(
        means=rng.normal(scale=0.1, size=(count, 3)).astype(np.float32),
        normals=normals.astype(np.float32),
        colors=rng.uniform(0, 1, (count, 3)).astype(np.float32),
        opacities=rng.uniform(0.05, 0.95, count).astype(np.float32),
        scales=scales.astype(np.float32),
        rotations=quats.astype(np.float32),
    )


def glb_json(payload: bytes) -> dict:
    magic, version, length = struct.unpack_from("<III", payload, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(payload))
    json_length, json_type = struct.unpack_from("<II", payload, 12)
    assert json_type == 0x4E4F534A
    return json.loads(payload[20 : 20 + json_length])


def test_png_round_trip_is_lossless() -> None:
    texture = face_texture(300)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(texture))))
    assert np.array_equal(decoded, texture)
    with pytest.raises(ValueError):
        encode_png(texture[..., 0])


def test_glb_passes_validator_and_round_trips(tmp_path: Path) -> None:
    mesh = hemisphere_mesh()
    texture = face_texture()
    path = tmp_path / "h0.glb"
    write_atomic(path, glb_bytes(mesh, encode_png(texture), "h0"))
    (report,) = validate_gltf(path)
    assert report["numErrors"] == 0, report["messages"]
    assert report["numWarnings"] == 0 and report["numHints"] == 0, report["messages"]

    tree = glb_json(path.read_bytes())
    primitive = tree["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= set(primitive["attributes"])
    material = tree["materials"][primitive["material"]]
    texture_index = material["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    assert tree["images"][tree["textures"][texture_index]["source"]]["mimeType"] == "image/png"

    loaded: Any = trimesh.load(path, force="mesh", process=False)
    assert np.allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    assert np.array_equal(loaded.faces, mesh.faces)
    assert np.allclose(loaded.visual.uv, mesh.uvs, atol=1e-6)  # v up again after trimesh's flip back
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    assert np.array_equal(image, texture)
    # Normals point out of the sphere: the winding is preserved.
    normals = np.asarray(loaded.vertex_normals)
    radial = loaded.vertices / np.linalg.norm(loaded.vertices, axis=1, keepdims=True)
    assert (np.sum(normals * radial, axis=1) > 0.9).mean() > 0.95


def test_glb_with_uv_seams_splits_vertices(tmp_path: Path) -> None:
    mesh = seamed_mesh()
    vertices, faces, uvs, source = split_uv_seams(mesh)
    assert len(vertices) == 6 and faces.shape == (2, 3)
    assert np.allclose(vertices, mesh.vertices[source])
    assert mesh.uv_faces is not None
    for face in range(2):  # every corner keeps its position and its own UV
        assert np.allclose(vertices[faces[face]], mesh.vertices[mesh.faces[face]])
        assert np.allclose(uvs[faces[face]], mesh.uvs[mesh.uv_faces[face]])
    path = tmp_path / "h0.glb"
    write_atomic(path, glb_bytes(mesh, encode_png(face_texture(64)), "h0"))
    (report,) = validate_gltf(path)
    assert report["numErrors"] == 0, report["messages"]


def test_glb_without_texture_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "plain.glb"
    write_atomic(path, glb_bytes(hemisphere_mesh(1), None, "plain"))
    (report,) = validate_gltf(path)
    assert report["numErrors"] == 0, report["messages"]
    assert "images" not in glb_json(path.read_bytes())


def test_obj_mtl_png(tmp_path: Path) -> None:
    mesh = hemisphere_mesh(2)
    texture = face_texture(128)
    files = obj_files(mesh, "h0", encode_png(texture))
    assert set(files) == {"h0.obj", "h0.mtl", "h0_texture.png"}
    for name, payload in files.items():
        write_atomic(tmp_path / name, payload)
    obj_text = files["h0.obj"].decode()
    assert "mtllib h0.mtl" in obj_text and "usemtl h0" in obj_text
    assert "map_Kd h0_texture.png" in files["h0.mtl"].decode()
    assert obj_text.count("\nv ") == len(mesh.vertices) and obj_text.count("\nf ") == len(mesh.faces)
    loaded: Any = trimesh.load(tmp_path / "h0.obj", process=False, maintain_order=True)
    assert np.allclose(loaded.vertices, mesh.vertices, atol=1e-5)
    assert np.array_equal(loaded.faces, mesh.faces)
    assert np.allclose(loaded.visual.uv, mesh.uvs, atol=1e-5)
    image = np.asarray(loaded.visual.material.image.convert("RGB"))
    assert np.array_equal(image, texture)


def test_obj_with_uv_faces_indexes_texcoords_separately() -> None:
    mesh = seamed_mesh()
    obj_text = obj_files(mesh, "h1", None)["h1.obj"].decode()
    assert obj_text.count("\nvt ") == 6
    assert "f 1/4/1 3/5/3 4/6/4" in obj_text


def test_splat_ply_layout_and_values(tmp_path: Path) -> None:
    splats = random_splats(500)
    path = tmp_path / "h0_splats.ply"
    write_atomic(path, splats_ply_bytes(splats))
    ply = PlyData.read(str(path))
    assert [element.name for element in ply.elements] == ["vertex"]
    vertex = ply["vertex"]
    assert tuple(p.name for p in vertex.properties) == SPLAT_PLY_PROPERTIES
    assert SPLAT_PLY_PROPERTIES == (
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
        "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
    )  # fmt: skip
    assert all(p.val_dtype in ("f4", "float32", "float") for p in vertex.properties)
    assert not ply.text and ply.byte_order == "<"
    assert vertex.count == 500
    columns = {name: np.asarray(vertex[name], dtype=np.float64) for name in SPLAT_PLY_PROPERTIES}
    means = np.column_stack([columns["x"], columns["y"], columns["z"]])
    assert np.allclose(means, splats.means, atol=1e-6)
    colors = np.column_stack([columns[f"f_dc_{i}"] for i in range(3)]) * SH_C0 + 0.5
    assert np.allclose(colors, splats.colors, atol=1e-5)
    assert np.allclose(1 / (1 + np.exp(-columns["opacity"])), splats.opacities, atol=1e-5)
    scales = np.exp(np.column_stack([columns[f"scale_{i}"] for i in range(3)]))
    assert np.allclose(scales, splats.scales, rtol=1e-5)
    quats = np.column_stack([columns[f"rot_{i}"] for i in range(4)])
    assert np.allclose(quats, splats.rotations, atol=1e-6)  # w, x, y, z order kept


def test_splat_ply_refuses_mismatched_arrays() -> None:
    splats = random_splats(10)
    splats.rotations = splats.rotations[:, :3]
    with pytest.raises(ValueError, match="rotations"):
        splats_ply_bytes(splats)


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    first = write_atomic(target, b"one")
    assert target.read_bytes() == b"one" and first.size == 3
    second = write_atomic(target, b"two!")
    assert target.read_bytes() == b"two!" and second.sha256 != first.sha256
    assert sorted(os.listdir(target.parent)) == ["file.bin"]
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"two!"  # the old file survives a failed write
    assert sorted(os.listdir(target.parent)) == ["file.bin"]


def test_write_head_files_honours_outputs(tmp_path: Path) -> None:
    mesh = hemisphere_mesh(2)
    written = write_head_files(
        mesh, encode_png(face_texture(64)), random_splats(20), "h3", tmp_path, {"glb", "splats"}
    )
    assert sorted(f.name for f in written) == ["h3.glb", "h3_splats.ply"]
    assert {f.kind for f in written} == {"glb", "splats"}
    assert sorted(os.listdir(tmp_path)) == ["h3.glb", "h3_splats.ply"]


def test_rasterizer_z_buffer_keeps_the_nearest_triangle() -> None:
    # Two overlapping triangles: the second is nearer (smaller depth) and must win where they overlap.
    points = np.array(
        [[2, 2, 5.0], [30, 2, 5.0], [2, 30, 5.0], [5, 5, 1.0], [35, 5, 1.0], [5, 35, 1.0]], dtype=np.float32
    )
    faces = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int32)
    raster = rasterize(points, faces, 40, 40)
    assert raster.triangle[10, 10] == 1 and raster.triangle[3, 3] == 0 and raster.triangle[39, 39] == -1
    swapped = points.copy()
    swapped[:3, 2], swapped[3:, 2] = 1.0, 5.0
    assert rasterize(swapped, faces, 40, 40).triangle[10, 10] == 0
    weights = raster.barycentric[10, 10]
    assert np.isclose(weights.sum(), 1.0, atol=1e-5)
    assert np.allclose(weights @ points[3:, :2], [10, 10], atol=1e-3)  # pixel (row 10, col 10)


def test_render_shows_the_texture() -> None:
    mesh = hemisphere_mesh()
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:, :32] = (255, 0, 0)  # u < 0.5 red, u >= 0.5 blue
    texture[:, 32:] = (0, 0, 255)
    render = render_textured(mesh, texture, 128, yaw_degrees=0.0)
    covered = np.any(render != render[0, 0], axis=2)
    assert 0.4 < covered.mean() < 0.8  # a disc of diameter 0.9 * 128
    left, right = render[64, 30].astype(int), render[64, 98].astype(int)
    assert left[0] > 3 * left[2] and right[2] > 3 * right[0]


def test_preview_composes_photo_and_renders() -> None:
    photo = np.ascontiguousarray(data.astronaut())
    mesh = hemisphere_mesh()
    image_mesh = Mesh(mesh.vertices * 1000 + np.array([250, 150, 0], dtype=np.float32), mesh.faces, mesh.uvs)
    detection = Detection(np.array([150, 50, 350, 250], dtype=np.float32), 0.9, np.zeros((6, 2), np.float32))
    heads = [Head(0, detection, mesh_image=image_mesh, mesh=mesh, texture=face_texture(128))]
    preview = compose_preview(photo, heads)
    assert preview.dtype == np.uint8 and preview.shape == (512, 1024, 3)
    assert not np.array_equal(preview[:, :512], photo)  # wireframe drawn over the photo
    assert np.array_equal(preview[5, 5], photo[5, 5])  # far from the head the photo is untouched
    assert np.array_equal(compose_preview(photo, []), photo)
