"""Package stage: a `Head` → files (GLB, OBJ + MTL + PNG, 3DGS PLY), each written atomically.

Conventions (see docs/artifacts.md):
- Meshes are exported in the head frame (meters, +Y up, face toward +Z), which is glTF's frame.
- `Mesh.uvs` have v up; the texture array's row 0 is the top of the image (v = 1). glTF stores v
  down, so the GLB writer (trimesh) flips v; OBJ keeps v up, as the format expects.
- The texture PNG is encoded once (OpenCV, fast zlib settings) and the same bytes go into the
  GLB and beside the OBJ. trimesh writes the GLB's geometry, normals, UVs and PBR material; we
  then append the PNG to its binary chunk as the base-color texture, because trimesh would
  re-encode the image with Pillow's slow default compression.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import trimesh
from numpy.typing import NDArray
from plyfile import PlyData, PlyElement

from headforge.files import write_atomic as write_bytes_atomic
from headforge.pipeline.geometry import angle_weighted_vertex_normals
from headforge.pipeline.types import Mesh, Splats

SH_C0 = 0.28209479177387814  # the zeroth real spherical-harmonic basis constant

# The property order of the 3DGS PLY layout that splat viewers read.
SPLAT_PLY_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz",
    "f_dc_0", "f_dc_1", "f_dc_2",
    "opacity",
    "scale_0", "scale_1", "scale_2",
    "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip

_GLB_MAGIC = 0x46546C67  # "glTF"
_CHUNK_JSON = 0x4E4F534A  # "JSON"
_CHUNK_BIN = 0x004E4942  # "BIN\0"
_GL_LINEAR = 9729
_GL_LINEAR_MIPMAP_LINEAR = 9987
_GL_CLAMP_TO_EDGE = 33071
_GL_ARRAY_BUFFER = 34962
_GL_ELEMENT_ARRAY_BUFFER = 34963


@dataclass(frozen=True)
class WrittenFile:
    """One artifact on disk."""

    name: str
    kind: str
    size: int
    sha256: str


def write_atomic(path: Path, data: bytes) -> WrittenFile:
    """Write one artifact atomically (mode 0644: artifacts are meant to be shared) and describe it."""
    write_bytes_atomic(path, data, mode=0o644)
    return WrittenFile(path.name, _kind_of(path.name), len(data), hashlib.sha256(data).hexdigest())


def _kind_of(name: str) -> str:
    if name.endswith("_splats.ply"):
        return "splats"
    if name.endswith("_splats_binding.npz"):
        return "binding"
    if name.endswith("_texture.png"):
        return "texture"
    if name == "preview.png" or name.endswith("_preview.png"):
        return "preview"
    if name == "result.json":
        return "result"
    return name.rsplit(".", 1)[-1]


# One-line encoder (C-accelerated: `json` falls back to pure Python whenever `indent` is set).
_JSON_LINE = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def json_bytes(document: Any) -> bytes:
    """Pretty, stable JSON (UTF-8, trailing newline): objects indented by 2, arrays of scalars on one
    line, arrays of such arrays one row per line (landmarks, matrices)."""
    return (_pretty_json(document, "\n") + "\n").encode("utf-8")


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list | tuple)


def _pretty_json(value: Any, newline: str) -> str:
    """`value` as JSON; `newline` is a line break plus the current indentation."""
    inner = newline + "  "
    if isinstance(value, dict) and value:
        items = (
            _JSON_LINE.encode(str(key)) + ": " + _pretty_json(item, inner) for key, item in value.items()
        )
        return "{" + inner + ("," + inner).join(items) + newline + "}"
    if isinstance(value, list | tuple) and value:
        if all(_is_scalar(item) for item in value):
            return _JSON_LINE.encode(value)
        if all(isinstance(row, list | tuple) and row and all(map(_is_scalar, row)) for row in value):
            rows = _JSON_LINE.encode(value)[1:-1]  # "[1, 2], [3, 4]": numbers and literals only
            if not any(isinstance(item, str) for row in value for item in row):
                return "[" + inner + rows.replace("], [", "]," + inner + "[") + newline + "]"
        return "[" + inner + ("," + inner).join(_pretty_json(item, inner) for item in value) + newline + "]"
    return _JSON_LINE.encode(value)


def encode_png(rgb: NDArray[np.uint8]) -> bytes:
    """Lossless PNG, tuned for speed: zlib level 1, RLE strategy, 'up' filter (~4x faster than
    Pillow's default at ~20% larger files on face textures)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    params = [
        cv2.IMWRITE_PNG_COMPRESSION, 1,
        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
        cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
    ]  # fmt: skip
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return encoded.tobytes()


def _export_normals(mesh: Mesh) -> NDArray[np.float32]:
    """The normals written into GLB and OBJ: angle-weighted, float32."""
    return angle_weighted_vertex_normals(mesh.vertices, mesh.faces).astype(np.float32)


def split_uv_seams(
    mesh: Mesh,
) -> tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.float32], NDArray[np.int32]]:
    """One vertex per (position, uv) pair, as glTF needs.

    Returns (vertices, faces, uvs, source_vertex) where `source_vertex` maps each output vertex to
    its index in `mesh.vertices`. Meshes with per-vertex UVs come back unchanged.
    """
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int32)
    uvs = np.asarray(mesh.uvs, dtype=np.float32)
    if mesh.uv_faces is None:
        if len(uvs) != len(vertices):
            raise ValueError(
                f"per-vertex UVs need one UV per vertex: {len(uvs)} UVs, {len(vertices)} vertices"
            )
        return vertices, faces, uvs, np.arange(len(vertices), dtype=np.int32)
    uv_faces = np.asarray(mesh.uv_faces, dtype=np.int32)
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], axis=1)
    unique_pairs, inverse = np.unique(pairs, axis=0, return_inverse=True)
    source = unique_pairs[:, 0].astype(np.int32)
    return vertices[source], inverse.reshape(-1, 3).astype(np.int32), uvs[unique_pairs[:, 1]], source


def glb_bytes(
    mesh: Mesh, texture_png: bytes | None, name: str, normals: NDArray[np.float32] | None = None
) -> bytes:
    """glTF 2.0 binary: indexed triangles with normals, TEXCOORD_0 and a PBR material whose
    base color is `texture_png` (already-encoded PNG bytes). `normals` are `_export_normals` of the
    mesh, when the caller has them already."""
    welded_normals = _export_normals(mesh) if normals is None else normals
    vertices, faces, uvs, source = split_uv_seams(mesh)
    material = trimesh.visual.material.PBRMaterial(
        name=name,
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=0.7,
        doubleSided=True,
    )
    geometry = trimesh.Trimesh(
        vertices=vertices,
        faces=faces,
        vertex_normals=welded_normals[source],
        visual=trimesh.visual.TextureVisuals(uv=uvs, material=material),
        process=False,
        validate=False,
    )
    geometry.metadata["name"] = name
    scene = trimesh.Scene()
    scene.add_geometry(geometry, geom_name=name, node_name=name)
    exported = trimesh.exchange.gltf.export_glb(scene, include_normals=True)
    morphs = None
    if mesh.morph_targets is not None:
        morphs = (
            list(mesh.morph_targets.names),
            np.asarray(mesh.morph_targets.deltas, np.float32)[:, source],
        )
    return _finish_glb(bytes(exported), texture_png, morphs)


def _add_morph_targets(
    tree: dict[str, Any], binary: bytes, names: list[str], deltas: NDArray[np.float32]
) -> bytes:
    """Append POSITION morph targets (K, V, 3) to the (single) mesh primitive, with default weights 0
    and the names in `mesh.extras.targetNames` (the convention three.js and Blender read)."""
    meshes = tree.get("meshes", [])
    if len(meshes) != 1 or len(meshes[0].get("primitives", [])) != 1:
        raise ValueError("morph targets need a GLB with one mesh primitive")
    primitive = meshes[0]["primitives"][0]
    views = tree.setdefault("bufferViews", [])
    accessors = tree.setdefault("accessors", [])
    targets = []
    for delta in deltas:
        offset = _padded(len(binary))
        data = np.ascontiguousarray(delta, dtype="<f4").tobytes()
        binary = binary.ljust(offset, b"\0") + data
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": _GL_ARRAY_BUFFER})
        accessors.append(
            {
                "bufferView": len(views) - 1,
                "componentType": 5126,  # FLOAT
                "count": len(delta),
                "type": "VEC3",
                "min": [float(v) for v in delta.min(axis=0)],
                "max": [float(v) for v in delta.max(axis=0)],
            }
        )
        targets.append({"POSITION": len(accessors) - 1})
    primitive["targets"] = targets
    meshes[0]["weights"] = [0.0] * len(targets)
    meshes[0].setdefault("extras", {})["targetNames"] = list(names)
    if not tree.get("buffers"):
        tree["buffers"] = [{"byteLength": 0}]
    tree["buffers"][0]["byteLength"] = len(binary)
    return binary


def _finish_glb(
    glb: bytes, png: bytes | None, morphs: tuple[list[str], NDArray[np.float32]] | None = None
) -> bytes:
    """Set buffer-view targets (trimesh leaves them out), add `morphs` (names, (K, V, 3) position
    offsets in the GLB's vertex order) as morph targets, and append `png` to the binary chunk as
    every material's base-color texture."""
    magic, version, _length = struct.unpack_from("<III", glb, 0)
    if magic != _GLB_MAGIC or version != 2:
        raise ValueError("not a glTF 2.0 binary")
    json_length, json_type = struct.unpack_from("<II", glb, 12)
    if json_type != _CHUNK_JSON:
        raise ValueError("GLB does not start with a JSON chunk")
    tree = json.loads(glb[20 : 20 + json_length])
    binary = b""
    offset = 20 + json_length
    if offset < len(glb):
        bin_length, bin_type = struct.unpack_from("<II", glb, offset)
        if bin_type != _CHUNK_BIN:
            raise ValueError("GLB second chunk is not BIN")
        binary = glb[offset + 8 : offset + 8 + bin_length]
    _set_buffer_view_targets(tree)
    if morphs is not None:
        binary = _add_morph_targets(tree, binary, *morphs)
    if png is not None:
        image_offset = _padded(len(binary))
        binary = binary.ljust(image_offset, b"\0") + png
        if not tree.get("buffers"):
            tree["buffers"] = [{"byteLength": 0}]
        tree["buffers"][0]["byteLength"] = len(binary)
        views = tree.setdefault("bufferViews", [])
        views.append({"buffer": 0, "byteOffset": image_offset, "byteLength": len(png)})
        images = tree.setdefault("images", [])
        images.append({"bufferView": len(views) - 1, "mimeType": "image/png"})
        samplers = tree.setdefault("samplers", [])
        samplers.append(
            {
                "magFilter": _GL_LINEAR,
                "minFilter": _GL_LINEAR_MIPMAP_LINEAR,
                "wrapS": _GL_CLAMP_TO_EDGE,
                "wrapT": _GL_CLAMP_TO_EDGE,
            }
        )
        textures = tree.setdefault("textures", [])
        textures.append({"sampler": len(samplers) - 1, "source": len(images) - 1})
        for material in tree.get("materials", []):
            pbr = material.setdefault("pbrMetallicRoughness", {})
            pbr["baseColorTexture"] = {"index": len(textures) - 1, "texCoord": 0}
    json_chunk = json.dumps(tree, separators=(",", ":")).encode("utf-8")
    json_chunk = json_chunk.ljust(_padded(len(json_chunk)), b" ")
    binary = binary.ljust(_padded(len(binary)), b"\0")
    total = 12 + 8 + len(json_chunk) + 8 + len(binary)
    return b"".join(
        [
            struct.pack("<III", _GLB_MAGIC, 2, total),
            struct.pack("<II", len(json_chunk), _CHUNK_JSON),
            json_chunk,
            struct.pack("<II", len(binary), _CHUNK_BIN),
            binary,
        ]
    )


def _set_buffer_view_targets(tree: dict[str, Any]) -> None:
    """Mark vertex and index buffer views with their GL target, as the validator recommends."""
    views = tree.get("bufferViews", [])
    accessors = tree.get("accessors", [])
    for mesh in tree.get("meshes", []):
        for primitive in mesh.get("primitives", []):
            used = [(index, _GL_ARRAY_BUFFER) for index in primitive.get("attributes", {}).values()]
            if "indices" in primitive:
                used.append((primitive["indices"], _GL_ELEMENT_ARRAY_BUFFER))
            for accessor_index, target in used:
                view_index = accessors[accessor_index].get("bufferView")
                if view_index is not None:
                    views[view_index]["target"] = target


def _padded(length: int) -> int:
    return (length + 3) & ~3


def obj_files(
    mesh: Mesh, stem: str, texture_png: bytes | None, normals: NDArray[np.float32] | None = None
) -> dict[str, bytes]:
    """Wavefront OBJ (v, vt, vn; faces v/vt/vn) + MTL + texture PNG, as {file name: bytes}.
    `normals` are `_export_normals` of the mesh, when the caller has them already."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    uvs = np.asarray(mesh.uvs, dtype=np.float64)
    uv_faces = faces if mesh.uv_faces is None else np.asarray(mesh.uv_faces, dtype=np.int64)
    if normals is None:
        normals = _export_normals(mesh)
    mtl_name = f"{stem}.mtl"
    texture_name = f"{stem}_texture.png"
    out = io.StringIO()
    out.write("# headforge head mesh: head frame, meters, +Y up, face toward +Z\n")
    out.write(f"mtllib {mtl_name}\no {stem}\n")
    out.write(_lines("v %.6f %.6f %.6f\n", vertices))
    out.write(_lines("vt %.6f %.6f\n", uvs))
    out.write(_lines("vn %.6f %.6f %.6f\n", np.asarray(normals, dtype=np.float64)))
    out.write(f"usemtl {stem}\ns 1\n")
    corners = np.stack([faces + 1, uv_faces + 1, faces + 1], axis=2).reshape(len(faces), 9)
    out.write(_lines("f %d/%d/%d %d/%d/%d %d/%d/%d\n", corners))
    mtl_lines = [
        f"newmtl {stem}",
        "Ka 1.000000 1.000000 1.000000",
        "Kd 1.000000 1.000000 1.000000",
        "Ks 0.000000 0.000000 0.000000",
        "d 1.0",
        "illum 1",
    ]
    files = {f"{stem}.obj": out.getvalue().encode("ascii")}
    if texture_png is not None:
        mtl_lines.append(f"map_Kd {texture_name}")
        files[texture_name] = texture_png
    files[mtl_name] = ("\n".join(mtl_lines) + "\n").encode("ascii")
    return files


def _lines(line_format: str, rows: NDArray[Any]) -> str:
    """One `line_format` line per row (what `np.savetxt` writes, in one formatting call)."""
    return (line_format * len(rows)) % tuple(rows.reshape(-1).tolist())


def splats_ply_bytes(splats: Splats) -> bytes:
    """Binary little-endian PLY in the 3DGS layout: SH DC colour, the higher SH coefficients when
    present (`f_rest_*`, channel-major: all red coefficients, then green, then blue, as 3DGS writes
    them), logit opacity, log scales, unit quaternion (w, x, y, z)."""
    count = len(splats.means)
    for field_name, array, width in (
        ("normals", splats.normals, 3),
        ("colors", splats.colors, 3),
        ("scales", splats.scales, 3),
        ("rotations", splats.rotations, 4),
    ):
        if np.shape(array) != (count, width):
            raise ValueError(f"splats.{field_name} has shape {np.shape(array)}, expected ({count}, {width})")
    if np.shape(splats.opacities) != (count,):
        raise ValueError(f"splats.opacities has shape {np.shape(splats.opacities)}, expected ({count},)")
    rest = np.zeros((count, 0))
    if splats.sh_rest is not None:
        coefficients = np.asarray(splats.sh_rest, dtype=np.float64)
        if coefficients.ndim != 3 or coefficients.shape[0] != count or coefficients.shape[2] != 3:
            raise ValueError(f"splats.sh_rest has shape {coefficients.shape}, expected ({count}, K, 3)")
        rest = coefficients.transpose(0, 2, 1).reshape(count, -1)
    rest_names = [f"f_rest_{index}" for index in range(rest.shape[1])]
    names = [*SPLAT_PLY_PROPERTIES[:9], *rest_names, *SPLAT_PLY_PROPERTIES[9:]]
    record = np.empty(count, dtype=[(name, "<f4") for name in names])
    means = np.asarray(splats.means, dtype=np.float64)
    normals = np.asarray(splats.normals, dtype=np.float64)
    dc = (np.clip(np.asarray(splats.colors, dtype=np.float64), 0.0, 1.0) - 0.5) / SH_C0
    opacity = np.clip(np.asarray(splats.opacities, dtype=np.float64), 1e-6, 1.0 - 1e-6)
    log_scales = np.log(np.maximum(np.asarray(splats.scales, dtype=np.float64), 1e-12))
    quats = np.asarray(splats.rotations, dtype=np.float64)
    quats = quats / np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)
    columns = [
        means[:, 0], means[:, 1], means[:, 2],
        normals[:, 0], normals[:, 1], normals[:, 2],
        dc[:, 0], dc[:, 1], dc[:, 2],
        np.log(opacity / (1.0 - opacity)),
        log_scales[:, 0], log_scales[:, 1], log_scales[:, 2],
        quats[:, 0], quats[:, 1], quats[:, 2], quats[:, 3],
    ]  # fmt: skip
    for name, column in zip(SPLAT_PLY_PROPERTIES, columns, strict=True):
        record[name] = column
    for index, name in enumerate(rest_names):
        record[name] = rest[:, index]
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(record, "vertex")], text=False, byte_order="<").write(buffer)
    return buffer.getvalue()


def write_head_files(
    mesh: Mesh | None,
    texture_png: bytes | None,
    splats: Splats | None,
    stem: str,
    out_dir: Path,
    outputs: frozenset[str] | set[str],
) -> list[WrittenFile]:
    """Write one head's requested artifacts (`glb`, `obj`, `splats`) into `out_dir`."""
    written: list[WrittenFile] = []
    normals = None
    if mesh is not None and outputs & {"glb", "obj"}:
        normals = _export_normals(mesh)  # once, for both formats
    if mesh is not None and "glb" in outputs:
        written.append(write_atomic(out_dir / f"{stem}.glb", glb_bytes(mesh, texture_png, stem, normals)))
    if mesh is not None and "obj" in outputs:
        for name, data in obj_files(mesh, stem, texture_png, normals).items():
            written.append(write_atomic(out_dir / name, data))
    if splats is not None and "splats" in outputs:
        written.append(write_atomic(out_dir / f"{stem}_splats.ply", splats_ply_bytes(splats)))
        if splats.binding is not None and mesh is not None and mesh.morph_targets is not None:
            from headforge.pipeline.rig import binding_npz_bytes

            binding = binding_npz_bytes(splats.binding, mesh.faces, len(mesh.vertices))
            written.append(write_atomic(out_dir / f"{stem}_splats_binding.npz", binding))
    return written
