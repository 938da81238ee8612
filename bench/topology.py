#!/usr/bin/env python
"""Template registration: accuracy cases (a) and (b) and the time per head (c), on the generated
24,049-vertex head template of `tests/template_synthetic.py` (MetaHuman's vertex count; MetaHuman
itself cannot ship in the repository).

(a) the template registered onto a known smooth deformation of itself (same topology): vertex error
    against the known deformation, mean and max;
(b) onto the same deformed surface meshed as a subdivided icosahedron (40,962 vertices): surface
    distance from the fitted template to the target, and from the target back to the fitted template;
(c) wall time of `register` per head (graph built once per template, as the pipeline caches it),
    median over --repeats runs of case (b), with the thread count of the process.

Both cases use 60 landmarks (template vertices spread by farthest-point sampling, at their known
deformed positions), as a FLAME or MediaPipe correspondence file would give.

Usage: OMP_NUM_THREADS=2 python bench/topology.py [--repeats N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from template_synthetic import deform, icosphere_target, landmark_vertices, make_template  # noqa: E402

from headforge.pipeline.registration import Landmarks, TargetSurface, prepare_template, register  # noqa: E402

MM = 1e-3
LANDMARKS = 60


def run(repeats: int = 5) -> dict[str, Any]:
    """Every figure of the benchmark, distances in mm, times in ms."""
    template = make_template()
    started = time.perf_counter()
    geometry = prepare_template(template.vertices, template.faces)
    prepare_ms = (time.perf_counter() - started) * 1000
    truth = deform(template.vertices)
    ids = landmark_vertices(template, LANDMARKS)
    landmarks = Landmarks(
        np.repeat(ids[:, None], 3, axis=1), np.tile([1.0, 0.0, 0.0], (LANDMARKS, 1)), truth[ids]
    )

    same = register(geometry, truth, template.faces, landmarks)
    vertex_error = np.linalg.norm(same.vertices - truth, axis=1)

    sphere_vertices, sphere_faces = icosphere_target(6)
    target = deform(sphere_vertices)
    times = []
    remeshed = None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        remeshed = register(geometry, target, sphere_faces, landmarks)
        times.append((time.perf_counter() - started) * 1000)
    assert remeshed is not None
    forward, _, _ = TargetSurface(target, sphere_faces).closest(remeshed.vertices)
    backward, _, _ = TargetSurface(remeshed.vertices, template.faces).closest(target)
    forward_distance = np.linalg.norm(forward - remeshed.vertices, axis=1)
    backward_distance = np.linalg.norm(backward - target, axis=1)
    return {
        "template_vertices": len(template.vertices),
        "template_faces": len(template.faces),
        "target_vertices_b": len(target),
        "landmarks": LANDMARKS,
        "max_deformation_mm": round(float(np.linalg.norm(truth - template.vertices, axis=1).max()) / MM, 2),
        "a_vertex_error_mean_mm": round(float(vertex_error.mean()) / MM, 4),
        "a_vertex_error_max_mm": round(float(vertex_error.max()) / MM, 4),
        "b_surface_distance_mean_mm": round(float(forward_distance.mean()) / MM, 4),
        "b_surface_distance_max_mm": round(float(forward_distance.max()) / MM, 4),
        "b_back_distance_mean_mm": round(float(backward_distance.mean()) / MM, 4),
        "b_vertex_error_mean_mm": round(
            float(np.linalg.norm(remeshed.vertices - truth, axis=1).mean()) / MM, 4
        ),
        "c_ms_per_head_median": round(statistics.median(times), 1),
        "c_ms_per_head_min": round(min(times), 1),
        "c_repeats": len(times),
        "graph_build_ms": round(prepare_ms, 1),
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    arguments = parser.parse_args()
    figures = run(arguments.repeats)
    if arguments.json:
        print(json.dumps(figures))
        return
    print("| figure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
