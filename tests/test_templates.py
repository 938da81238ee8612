"""The template store and the retopology tool: import from OBJ and GLB (seams, groups, landmarks),
listing, `headforge topology fit` through the CLI (OBJ layout kept, GLB through the Khronos validator),
and every bad input refused with its code and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from template_synthetic import (
    NUM_VERTICES,
    SyntheticTemplate,
    deform,
    icosphere_target,
    landmark_vertices,
    make_template,
    write_landmarks,
    write_obj,
)

from headforge.errors import HeadforgeError, MeshTooLargeError, TemplateLandmarksMissingError
from headforge.files import sha256_file
from headforge.pipeline import retopology
from headforge.pipeline.package import glb_bytes
from headforge.pipeline.retopology import fit_template_to_mesh, read_target_mesh
from headforge.pipeline.types import Mesh
from headforge.templates import (
    import_template,
    list_templates,
    load_template,
    require_landmarks,
    template_path,
)


@pytest.fixture(scope="module")
def template() -> SyntheticTemplate:
    return make_template()


@pytest.fixture(scope="module")
def files(template: SyntheticTemplate, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("template-files")
    ids = landmark_vertices(template, 12)
    entries: list[dict[str, object]] = [{"vertex": int(v), "flame": int(k * 100)} for k, v in enumerate(ids)]
    first = template.faces[0]
    entries.append({"triangle": [int(i) for i in first], "barycentric": [0.2, 0.3, 0.5], "mediapipe": 1})
    groups = {"face": np.flatnonzero(template.face_region).tolist()}
    return {
        "obj": write_obj(template, base / "head.obj"),
        "landmarks": write_landmarks(base / "points.json", entries, groups),
        "base": base,
    }


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEADFORGE_TEMPLATES", str(tmp_path / "templates"))
    return tmp_path / "templates"


def _cli(*args: str, env_store: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEADFORGE_TEMPLATES": str(env_store)}
    return subprocess.run(
        [sys.executable, "-m", "headforge", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_obj_import_keeps_seams_groups_and_landmarks(
    template: SyntheticTemplate, files: dict[str, Path], store: Path
) -> None:
    path = import_template("studio", files["obj"], files["landmarks"])
    assert path == template_path("studio") and path.parent == store
    stored = load_template("studio")
    assert len(stored.vertices) == NUM_VERTICES and len(stored.faces) == len(template.faces)
    assert len(stored.uvs) == len(template.uvs) > NUM_VERTICES  # seam copies kept
    np.testing.assert_allclose(stored.vertices, template.vertices, atol=1e-6)
    np.testing.assert_array_equal(stored.groups["face"], template.face_region)
    assert stored.landmarks is not None
    assert stored.landmarks.count("flame") == 12 and stored.landmarks.count("mediapipe") == 1
    np.testing.assert_allclose(stored.landmarks.weights[-1], [0.2, 0.3, 0.5])
    (entry,) = list_templates()
    assert entry["name"] == "studio" and entry["groups"] == {"face": int(template.face_region.sum())}
    assert entry["source"]["mesh"]["sha256"] == sha256_file(files["obj"])
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temp files left


def test_glb_import_welds_the_split_seams(
    template: SyntheticTemplate, files: dict[str, Path], store: Path
) -> None:
    mesh = Mesh(template.vertices.astype(np.float32), template.faces.astype(np.int32), template.uvs.astype(np.float32),
                template.uv_faces.astype(np.int32), topology="test")  # fmt: skip
    glb = files["base"] / "head.glb"
    glb.write_bytes(glb_bytes(mesh, None, "head"))
    split = trimesh.load(glb, force="mesh", process=False)
    assert isinstance(split, trimesh.Trimesh) and len(split.vertices) > NUM_VERTICES  # split at the seams
    # Landmark ids of a GLB refer to its own (split) vertex order.
    landmarks = write_landmarks(files["base"] / "glb_points.json", [{"vertex": len(split.vertices) - 1, "flame": 7},
                                {"vertex": 0, "flame": 8}])  # fmt: skip
    import_template("fromglb", glb, landmarks)
    stored = load_template("fromglb")
    assert len(stored.vertices) == NUM_VERTICES and len(stored.uvs) == len(split.vertices)
    assert stored.landmarks is not None
    welded = stored.landmarks.vertices[:, 0]
    np.testing.assert_allclose(
        stored.vertices[welded], np.asarray(split.vertices)[[len(split.vertices) - 1, 0]], atol=1e-6
    )


def test_cli_import_list_and_fit(template: SyntheticTemplate, files: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "cli-store"
    imported = _cli("template", "import", "studio", str(files["obj"]), env_store=store)
    assert imported.returncode == 0, imported.stderr
    assert "no landmarks" in imported.stdout  # pipelines will refuse it; topology fit works
    listed = _cli("template", "list", "--json", env_store=store)
    assert json.loads(listed.stdout)[0]["landmarks"] == {"flame": 0, "mediapipe": 0}
    sphere, faces = icosphere_target(5)
    target = tmp_path / "scan.ply"
    exported = trimesh.Trimesh(deform(sphere), faces, process=False).export(file_type="ply")
    assert isinstance(exported, bytes)
    target.write_bytes(exported)
    fitted = _cli(
        "topology", "fit", "studio", str(target), "-o", str(tmp_path / "out.obj"), "--json", env_store=store
    )
    assert fitted.returncode == 0, fitted.stderr
    report = json.loads(fitted.stdout)
    assert report["residual_mm"] < 0.5 and report["driven_share"] > 0.95
    lines = (tmp_path / "out.obj").read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == NUM_VERTICES
    assert sum(line.startswith("vt ") for line in lines) == len(template.uvs)
    faces_out = [line for line in lines if line.startswith("f ")]
    assert len(faces_out) == len(template.faces)
    first = [tuple(int(i) for i in corner.split("/")) for corner in faces_out[0].split()[1:]]
    assert first == [(v + 1, t + 1) for v, t in zip(template.faces[0], template.uv_faces[0], strict=True)]
    glb = _cli("topology", "fit", "studio", str(target), "-o", str(tmp_path / "out.glb"), env_store=store)
    assert glb.returncode == 0, glb.stderr
    from gltf_validator import validate_gltf

    (validation,) = validate_gltf(tmp_path / "out.glb")
    assert validation["numErrors"] == 0, validation


def test_quads_come_back_as_quads(tmp_path: Path, store: Path) -> None:
    """An OBJ template's polygons survive the fit: the output OBJ has the same `f` lines."""
    box = trimesh.creation.box(extents=(0.15, 0.2, 0.18))
    corners = np.asarray(box.vertices)
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    lines = [f"v {x} {y} {z}" for x, y, z in corners] + [
        f"vt {u} {v}" for u, v in [(0, 0), (1, 0), (1, 1), (0, 1)]
    ]
    lines += ["f " + " ".join(f"{i + 1}/{k + 1}" for k, i in enumerate(quad)) for quad in quads]
    source = tmp_path / "box.obj"
    source.write_text("\n".join(lines) + "\n")
    import_template("box", source)
    stored = load_template("box")
    assert len(stored.faces) == 12
    text = retopology.template_obj_bytes(stored, stored.vertices).decode()
    assert [line for line in text.splitlines() if line.startswith("f ")] == lines[-6:]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("empty", "template_empty"),
        ("no_uvs", "template_no_uvs"),
        ("non_manifold", "template_non_manifold"),
        ("flipped", "template_non_manifold"),
        ("vertex_out_of_range", "template_landmark_out_of_range"),
        ("flame_out_of_range", "template_landmark_out_of_range"),
        ("mediapipe_out_of_range", "template_landmark_out_of_range"),
        ("group_out_of_range", "template_landmark_out_of_range"),
        ("uvs_outside", "template_uvs_out_of_range"),
        ("not_a_mesh", "invalid_mesh"),
    ],
)
def test_bad_templates_are_refused_and_nothing_changes(
    case: str, code: str, files: dict[str, Path], tmp_path: Path, store: Path
) -> None:
    import_template("studio", files["obj"], files["landmarks"])
    before = sha256_file(template_path("studio"))
    tetra_v = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\n"
    tetra_f = "f 1/1 3/3 2/2\nf 1/1 2/2 4/3\nf 1/1 4/3 3/3\nf 2/1 3/2 4/3\n"
    mesh = files["obj"]
    landmarks: Path | None = None
    if case == "empty":
        mesh = _write(tmp_path / "empty.obj", "# nothing\n")
    elif case == "no_uvs":
        mesh = _write(tmp_path / "no_uvs.obj", tetra_v + "f 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n")
    elif case == "non_manifold":  # a fifth triangle on edge 1-2
        mesh = _write(tmp_path / "fin.obj", tetra_v + "v 1 1 1\n" + tetra_f + "f 1/1 2/2 5/3\n")
    elif case == "flipped":
        mesh = _write(tmp_path / "flipped.obj", tetra_v + tetra_f.replace("f 2/1 3/2 4/3", "f 2/1 4/3 3/2"))
    elif case == "uvs_outside":
        mesh = _write(tmp_path / "udim.obj", tetra_v.replace("vt 0 1", "vt 0 1.5") + tetra_f)
    elif case == "not_a_mesh":
        mesh = _write(tmp_path / "broken.obj", "v 1 2\nf 1 x y\n")
    else:
        entries: dict[str, dict[str, object]] = {
            "vertex_out_of_range": {"vertex": NUM_VERTICES, "flame": 1},
            "flame_out_of_range": {"vertex": 0, "flame": 5023},
            "mediapipe_out_of_range": {"vertex": 0, "mediapipe": 468},
            "group_out_of_range": {"vertex": 0, "flame": 1},
        }
        entry = entries[case]
        groups = {"face": [0, NUM_VERTICES + 5]} if case == "group_out_of_range" else None
        landmarks = write_landmarks(tmp_path / "bad.json", [entry], groups)
    with pytest.raises(HeadforgeError) as caught:
        import_template("studio", mesh, landmarks)
    assert caught.value.code == code, caught.value.message
    assert sha256_file(template_path("studio")) == before  # the stored template is untouched
    assert sorted(p.name for p in store.iterdir()) == ["studio.npz"]
    # The CLI says the same with a non-zero exit.
    completed = _cli("template", "import", "studio", str(mesh), *(["--landmarks", str(landmarks)] if landmarks else []),
                     env_store=store)  # fmt: skip
    assert completed.returncode != 0 and code in completed.stderr


def test_templates_without_landmarks(
    template: SyntheticTemplate, files: dict[str, Path], store: Path
) -> None:
    import_template("bare", files["obj"])
    bare = load_template("bare")
    with pytest.raises(TemplateLandmarksMissingError):
        require_landmarks(bare, "flame")
    with pytest.raises(TemplateLandmarksMissingError):  # a FLAME target needs FLAME landmarks
        fit_template_to_mesh(bare, np.zeros((5023, 3)), np.array([[0, 1, 2]]), target_kind="flame")


def test_target_mesh_limits_and_bad_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    ply = sphere.export(file_type="ply")
    assert isinstance(ply, bytes)
    vertices, faces = read_target_mesh(ply, "scan.ply")
    assert len(vertices) == len(sphere.vertices) and len(faces) == len(sphere.faces)
    monkeypatch.setattr(retopology, "MAX_TARGET_VERTICES", 100)
    with pytest.raises(MeshTooLargeError):
        read_target_mesh(ply, "scan.ply")
    with pytest.raises(MeshTooLargeError):  # counted from the OBJ's lines before parsing
        read_target_mesh(b"v 0 0 0\n" * 101 + b"f 1 2 3\n", "scan.obj")
    for data, name in (
        (b"solid\n", "scan.stl"),
        (b"", "scan.obj"),
        (b"garbage", "scan.glb"),
        (b"v 0 0 0\n", "scan.obj"),
    ):
        with pytest.raises(HeadforgeError) as caught:
            read_target_mesh(data, name)
        assert caught.value.code == "invalid_mesh"


def test_fit_refuses_a_target_that_does_not_overlap(
    template: SyntheticTemplate, files: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    assert _cli("template", "import", "studio", str(files["obj"]), env_store=store).returncode == 0
    far = tmp_path / "far.ply"
    sphere, faces = icosphere_target(4)
    exported = trimesh.Trimesh(sphere + np.array([2.0, 0.0, 0.0]), faces, process=False).export(
        file_type="ply"
    )
    assert isinstance(exported, bytes)
    far.write_bytes(exported)
    completed = _cli("topology", "fit", "studio", str(far), "-o", str(tmp_path / "far.glb"), env_store=store)
    assert completed.returncode != 0 and "target_not_overlapping" in completed.stderr
    assert not (tmp_path / "far.glb").exists()
