#!/usr/bin/env python
"""Time the texture step per head (the default `facemesh` pipeline, texture 1024²), with a reference in
the same run.

For every head found in the photos given: the person mask (selfie segmentation), `unwrap_view`,
`finish_texture`, and their sum (the step the runner runs per head). Reference: `unwrap_texture` of
another texture module, loaded from a file (for example the code before a change:
`git show 19e2735:headforge/pipeline/texture.py > /tmp/texture_before.py`), on the same heads; the
ratio is ours ÷ reference. Each head is timed REPEATS times, the median kept; printed as one JSON line.
Wall time and, as `*_cpu_*`, process CPU time (all threads: the work done, less sensitive to other
processes on a shared machine; the CPU figure of ours sums the medians over heads of each part).

Usage: python bench/texture_speed.py PHOTO [PHOTO ...] [--reference-module FILE] [--size 1024]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headforge.pipeline.decode import decode_image  # noqa: E402
from headforge.pipeline.landmarks import find_heads  # noqa: E402
from headforge.pipeline.process import keep_freed_memory  # noqa: E402
from headforge.pipeline.run import facemesh_symmetry, fit_facemesh  # noqa: E402
from headforge.pipeline.texture import finish_texture, unwrap_view  # noqa: E402
from headforge.pipeline.texture_mask import person_masks  # noqa: E402

REPEATS = 5


CPU_TIMES: dict[str, list[float]] = {}  # per timed call name: median process CPU ms per head


def median_ms(call: Callable[..., Any], *args: Any) -> float:
    """Median wall time of `call(*args)` over REPEATS calls, in ms. The median process CPU time (all
    threads; less sensitive to other processes on a shared machine) goes to CPU_TIMES."""
    times, cpu = [], []
    for _ in range(REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        call(*args)
        times.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    CPU_TIMES.setdefault(getattr(call, "__name__", "call"), []).append(float(np.median(cpu)))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--reference-module", type=Path)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    from headforge.models.runtime import load_default_networks

    keep_freed_memory()  # as every pipeline run does (runner.reconstruct), so the step is timed as it runs
    networks = load_default_networks()
    symmetry = facemesh_symmetry()
    reference = None
    if args.reference_module is not None:
        spec = importlib.util.spec_from_file_location("texture_reference", args.reference_module)
        assert spec is not None and spec.loader is not None
        reference = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = reference  # dataclasses look their module up
        spec.loader.exec_module(reference)
    rows: dict[str, list[float]] = {"mask": [], "unwrap": [], "finish": [], "ours": [], "reference": []}
    for path in args.photos:
        rgb = decode_image(path.read_bytes()).rgb
        for head in find_heads(rgb, networks):
            fit_facemesh(head, rgb)
            mesh = head.mesh_image
            assert mesh is not None
            finish_texture(unwrap_view(rgb, mesh, args.size, symmetry))  # warm the UV plan cache
            mask_ms = median_ms(person_masks, rgb, [mesh], networks)
            mask = person_masks(rgb, [mesh], networks)[0]
            unwrap_ms = median_ms(unwrap_view, rgb, mesh, args.size, symmetry, mask)
            texels = unwrap_view(rgb, mesh, args.size, symmetry, mask)
            finish_ms = median_ms(finish_texture, texels)
            rows["mask"].append(mask_ms)
            rows["unwrap"].append(unwrap_ms)
            rows["finish"].append(finish_ms)
            rows["ours"].append(mask_ms + unwrap_ms + finish_ms)
            if reference is not None:
                reference_ms = median_ms(reference.unwrap_texture, rgb, mesh, args.size, symmetry)
                rows["reference"].append(reference_ms)
    summary: dict[str, Any] = {"heads": len(rows["ours"]), "size": args.size}
    for key, values in rows.items():
        if values:
            summary[f"{key}_ms_per_head"] = round(float(np.median(values)), 2)
    cpu = {name: float(np.median(values)) for name, values in CPU_TIMES.items()}
    ours_cpu = sum(cpu.get(name, 0.0) for name in ("person_masks", "unwrap_view", "finish_texture"))
    summary["ours_cpu_ms_per_head"] = round(ours_cpu, 2)
    if "unwrap_texture" in cpu:
        summary["reference_cpu_ms_per_head"] = round(cpu["unwrap_texture"], 2)
        summary["cpu_ratio_vs_reference"] = round(ours_cpu / cpu["unwrap_texture"], 3)
    if rows["reference"]:
        summary["ratio_vs_reference"] = round(
            summary["ours_ms_per_head"] / summary["reference_ms_per_head"], 3
        )
        summary["added_ms_per_head"] = round(
            summary["ours_ms_per_head"] - summary["reference_ms_per_head"], 2
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
