#!/usr/bin/env python
"""Driving speed: frames per second for deforming a FLAME head and its bound splats on the CPU.

Per frame: the head's 5023 vertices for new expression (K = 16) and jaw parameters (FLAME with the
jaw joint: expression blendshapes on the head's precomputed identity, jaw pose correctives and
skinning, `animate.FlameDriver`, as `headforge animate` runs it; also timed: the general
`FlameLandmarkModel.vertices` over all 150 shape and expression components),
then N bound splats (default 8,192) posed on that mesh (`SplatDeformer.pose`: centres, rotations,
scales, normals). Timed one frame at a time (an interactive driver) and in batches of frames (an
offline sequence). Also timed: the morph-target path a glTF player uses (base + weights · targets).
The FLAME asset is the imported one when present, else the synthetic FLAME of the tests (same
sizes: 5023 vertices, 9976 triangles, 150 linear components). Threads: set OMP_NUM_THREADS (and
OPENBLAS_NUM_THREADS) before running, e.g. 2.

Usage: OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python bench/animation_speed.py [--splats 8192] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from headforge.models.flame_import import flame_asset_path, flame_unavailable_reason, load_flame_asset  # noqa: E402
from headforge.pipeline.animate import FlameDriver, flame_morph_targets  # noqa: E402
from headforge.pipeline.flame_fit import FlameFit, FlameLandmarkModel  # noqa: E402
from headforge.pipeline.splats import sample_splats  # noqa: E402
from headforge.pipeline.types import Mesh  # noqa: E402


def _per_call(function: Callable[[], object], seconds: float = 1.5) -> float:
    """Median seconds per call over repeated runs lasting about `seconds`."""
    function()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splats", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if flame_unavailable_reason(flame_asset_path()) is None:
        asset_name, asset_path = "imported", flame_asset_path()
    else:
        from flame_synthetic import imported_synthetic_flame

        asset_name = "synthetic"
        asset_path = imported_synthetic_flame(Path(tempfile.mkdtemp(prefix="headforge-bench-")))[1]
    model = FlameLandmarkModel(load_flame_asset(asset_path))
    rng = np.random.default_rng(0)
    fit = FlameFit(
        shape=rng.normal(0, 1, model.num_shape),
        expression=np.zeros(model.num_expression),
        jaw_pose=np.zeros(3),
        rotation=np.eye(3),
        translation=np.zeros(3),
        scale=1.0,
        residual_px=0.0,
        iterations=0,
    )
    z = np.concatenate([fit.shape, fit.expression])
    rest = model.vertices(z[None], fit.jaw_pose[None])[0]
    assert model.asset.uvs is not None
    mesh = Mesh(
        rest.astype(np.float32), model.asset.faces, model.asset.uvs, model.asset.uv_faces, "flame5023"
    )
    splats = sample_splats(mesh, np.full((64, 64, 3), 128, np.uint8), args.splats, seed=0)
    assert splats.binding is not None
    from headforge.pipeline.rig import SplatDeformer

    deformer = SplatDeformer(splats.binding, mesh.faces)
    targets = flame_morph_targets(model, fit, 16).deltas.reshape(17, -1)
    base = rest.astype(np.float32).reshape(-1)

    def parameters(count: int) -> tuple[np.ndarray, np.ndarray]:
        coefficients = np.tile(z, (count, 1))
        coefficients[:, model.num_shape : model.num_shape + 16] = rng.normal(0, 1, (count, 16))
        jaw = np.zeros((count, 3))
        jaw[:, 0] = rng.uniform(0, 0.3, count)
        return coefficients, jaw

    one = parameters(1)
    many = parameters(args.batch)
    one_vertices = model.vertices(*one).astype(np.float32)
    many_vertices = model.vertices(*many).astype(np.float32)
    weights_one = rng.normal(0, 1, (1, 17)).astype(np.float32)
    weights_many = rng.normal(0, 1, (args.batch, 17)).astype(np.float32)

    driver = FlameDriver(model, fit.shape, 16)
    drive_one = (one[0][:, model.num_shape : model.num_shape + 16], one[1])
    drive_many = (many[0][:, model.num_shape : model.num_shape + 16], many[1])
    np.testing.assert_allclose(driver.vertices(*drive_many), many_vertices, atol=1e-5)
    general_one = _per_call(lambda: model.vertices(*one))
    flame_one = _per_call(lambda: driver.vertices(*drive_one))
    flame_many = _per_call(lambda: driver.vertices(*drive_many)) / args.batch
    morph_one = _per_call(lambda: base + weights_one @ targets)
    morph_many = _per_call(lambda: base + weights_many @ targets) / args.batch
    splats_one = _per_call(lambda: deformer.pose(one_vertices[0]))
    splats_many = _per_call(lambda: deformer.pose(many_vertices)) / args.batch
    import os

    load = os.getloadavg()[0]
    report = {
        "asset": asset_name,
        "splats": args.splats,
        "batch": args.batch,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "ms_flame_general_per_frame": round(general_one * 1e3, 3),
        "ms_flame_per_frame": round(flame_one * 1e3, 3),
        "ms_flame_per_frame_batched": round(flame_many * 1e3, 3),
        "ms_morph_per_frame": round(morph_one * 1e3, 3),
        "ms_morph_per_frame_batched": round(morph_many * 1e3, 3),
        "ms_splats_per_frame": round(splats_one * 1e3, 3),
        "ms_splats_per_frame_batched": round(splats_many * 1e3, 3),
        "fps_flame_and_splats": round(1.0 / (flame_one + splats_one), 1),
        "fps_flame_and_splats_batched": round(1.0 / (flame_many + splats_many), 1),
        "fps_morph_and_splats": round(1.0 / (morph_one + splats_one), 1),
        "load_average_1min": round(load, 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
