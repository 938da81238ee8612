"""`headforge animate` end to end: the flame pipeline on a real photo (synthetic FLAME asset), then
frames driven by an expression sequence; bad sequences and non-FLAME results fail cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from plyfile import PlyData

from headforge.models.flame_import import load_flame_asset
from headforge.pipeline.flame_fit import FlameLandmarkModel
from headforge.pipeline.rig import read_binding

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = ROOT / "examples" / "astronaut.jpg"


def _headforge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headforge", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def flame_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A flame-pipeline result folder for the astronaut, and the environment that made it."""
    base = tmp_path_factory.mktemp("animate")
    _, asset = imported_synthetic_flame(tmp_path_factory.getbasetemp())
    env = {**os.environ, "HEADFORGE_FLAME_ASSET": str(asset), "OMP_NUM_THREADS": "1"}
    done = _headforge(
        "reconstruct", str(ASTRONAUT), "-o", str(base / "out"), "--pipeline", "flame",
        "--texture-size", "512", "--splats", "2000", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return base / "out" / "astronaut", asset, env


def test_animate_writes_bound_frames(flame_result: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    result_dir, asset, env = flame_result
    document = json.loads((result_dir / "result.json").read_text())
    (head,) = document["heads"]
    assert head["params"]["morph_targets"][-1] == "jaw_open" and len(head["params"]["morph_targets"]) == 17
    assert head["artifacts"]["binding"] == "h0_splats_binding.npz"
    rng = np.random.default_rng(0)
    frames = [
        {"expression": [0.0] * 16},
        {"expression": rng.normal(0, 1.5, 16).tolist(), "jaw": [0.25, 0.0, 0.0]},
        {"expression": rng.normal(0, 1.5, 16).tolist(), "jaw": [0.1, 0.05, 0.0]},
    ]
    sequence = tmp_path / "seq.json"
    sequence.write_text(json.dumps({"fps": 25, "frames": frames}))
    done = _headforge(
        "animate", str(result_dir), "--expressions", str(sequence), "-o", str(tmp_path / "f"), env=env
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "f" / "animation.json").read_text())
    assert summary["frames"] == 3 and summary["heads"] == ["h0"] and len(summary["files"]) == 6

    model = FlameLandmarkModel(load_flame_asset(asset))
    binding, faces, _ = read_binding((result_dir / "h0_splats_binding.npz").read_bytes())
    rest = PlyData.read(str(result_dir / "h0_splats.ply"))["vertex"]
    for index, frame in enumerate(frames):
        mesh = PlyData.read(str(tmp_path / "f" / f"f{index:04d}_h0_mesh.ply"))
        vertices = np.stack([mesh["vertex"][axis] for axis in "xyz"], axis=1).astype(np.float64)
        assert np.array_equal(np.stack(mesh["face"]["vertex_indices"]), faces)
        z = np.zeros(model.num_linear)
        z[: model.num_shape] = head["params"]["shape"]
        z[model.num_shape : model.num_shape + 16] = frame["expression"]
        truth = model.vertices(z[None], np.asarray([frame.get("jaw", [0.0, 0.0, 0.0])], np.float64))[0]
        np.testing.assert_allclose(vertices, truth, atol=2e-6)
        splats = PlyData.read(str(tmp_path / "f" / f"f{index:04d}_h0_splats.ply"))["vertex"]
        means = np.stack([splats[axis] for axis in "xyz"], axis=1).astype(np.float64)
        corners = vertices[faces[binding.triangles]]
        on_surface = np.einsum("nk,nkc->nc", binding.barycentrics.astype(np.float64), corners)
        normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        np.testing.assert_allclose(means, on_surface + binding.offsets[:, None] * normal, atol=1e-5)
        for name in ("f_dc_0", "opacity"):  # appearance comes from the result's splats
            np.testing.assert_allclose(splats[name], rest[name], atol=1e-5)
    # The expressions move the head: frame 1 differs from frame 0 by millimetres.
    first, second = (
        np.stack([PlyData.read(str(tmp_path / "f" / f"f000{i}_h0_mesh.ply"))["vertex"][a] for a in "xyz"], 1)
        for i in (0, 1)
    )
    assert np.linalg.norm(first - second, axis=1).max() > 1e-3


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        (
            {"frames": [{"expression": [0.0] * 10}]},
            "frame 0 expression must be an array of 16 numbers, got 10",
        ),
        ({"frames": [{"expression": [0.0] * 16, "jaw": [0, 0]}]}, "frame 0 jaw must be an array of 3"),
        ("not json", "cannot read the expression sequence"),
    ],
)
def test_animate_refuses_bad_sequences(
    flame_result: tuple[Path, Path, dict[str, str]], tmp_path: Path, sequence: object, message: str
) -> None:
    result_dir, _, env = flame_result
    path = tmp_path / "seq.json"
    path.write_text(sequence if isinstance(sequence, str) else json.dumps(sequence))
    done = _headforge("animate", str(result_dir), "-e", str(path), "-o", str(tmp_path / "f"), env=env)
    assert done.returncode == 2
    assert "[invalid_sequence]" in done.stderr and message in done.stderr, done.stderr
    assert not (tmp_path / "f" / "f0000_h0_mesh.ply").exists()


def test_animate_refuses_a_result_without_flame(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "result.json").write_text(
        json.dumps({"pipeline": "facemesh", "heads": [{"index": 0, "params": {}}]})
    )
    (tmp_path / "seq.json").write_text(json.dumps({"frames": [{"expression": [0.0] * 16}]}))
    done = _headforge(
        "animate",
        str(tmp_path / "r"),
        "-e",
        str(tmp_path / "seq.json"),
        "-o",
        str(tmp_path / "f"),
        env=dict(os.environ),
    )
    assert done.returncode == 2 and "no animatable head" in done.stderr, done.stderr
    assert "[not_animatable]" in done.stderr, done.stderr
    done = _headforge(
        "animate",
        str(tmp_path / "absent"),
        "-e",
        str(tmp_path / "seq.json"),
        "-o",
        str(tmp_path / "f"),
        env=dict(os.environ),
    )
    assert done.returncode == 2 and "no readable result.json" in done.stderr, done.stderr
