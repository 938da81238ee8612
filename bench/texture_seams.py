#!/usr/bin/env python
"""Colour step across the boundary between seen and filled texels, on real photos.

For every head the default (`facemesh`) pipeline finds in the photos of DATA_DIR (AFLW2000 sample,
VOC group photos), the texture is built as the pipeline builds it (person mask, mirror fill,
inpainting, seam blending), with its mask of the texels seen directly in the photo. Inside the UV islands, every pair of 4-neighbour texels is one of:
- seen/seen: both seen directly;
- boundary: one seen directly, the other filled (mirrored or inpainted).
The colour difference of a pair is ΔE*ab (CIE 1976: Euclidean distance in CIELAB, D65, sRGB input).
Per head: ratio = median ΔE over boundary pairs / median ΔE over seen/seen pairs (goal ≤ 1.5).
Printed: one JSON line per head, then a summary (median of the per-head ratios, overall and for
turned heads, |yaw| ≥ 30°) as JSON.

Usage: python bench/texture_seams.py DATA_DIR [DATA_DIR ...] [--size 1024] [--label NAME] [--no-mask]
(`--no-mask`: without the person mask, to see what the mask alone changes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headforge.pipeline.decode import decode_image  # noqa: E402
from headforge.pipeline.geometry import cached_uv_raster  # noqa: E402
from headforge.pipeline.landmarks import find_heads  # noqa: E402
from headforge.pipeline.run import facemesh_symmetry, fit_facemesh  # noqa: E402
from headforge.pipeline.texture import build_texture  # noqa: E402
from headforge.pipeline.texture_mask import person_masks  # noqa: E402

TURNED_YAW = 30.0


def lab(texture: NDArray[np.uint8]) -> NDArray[np.float32]:
    """CIELAB (L in 0..100) of an sRGB uint8 image."""
    return np.asarray(cv2.cvtColor(texture.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab), np.float32)


def seam_steps(
    texture: NDArray[np.uint8], seen: NDArray[np.bool_], islands: NDArray[np.bool_]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """ΔE of 4-neighbour texel pairs inside the islands: (boundary pairs, seen/seen pairs)."""
    colours = lab(texture)
    boundary: list[NDArray[np.float32]] = []
    interior: list[NDArray[np.float32]] = []
    for axis in (0, 1):
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(first), tuple(second)
        both = islands[a] & islands[b]
        delta = np.linalg.norm(colours[a] - colours[b], axis=-1)
        boundary.append(delta[both & (seen[a] != seen[b])])
        interior.append(delta[both & seen[a] & seen[b]])
    return np.concatenate(boundary), np.concatenate(interior)


def measure(
    path: Path, size: int, symmetry: NDArray[np.int32], networks: object, masked: bool = True
) -> list[dict[str, object]]:
    """One record per head of the photo."""
    rgb = decode_image(path.read_bytes()).rgb
    rows: list[dict[str, object]] = []
    heads = find_heads(rgb, networks)  # type: ignore[arg-type]
    for head in heads:
        fit_facemesh(head, rgb)
    meshes = [head.mesh_image for head in heads if head.mesh_image is not None]
    masks = person_masks(rgb, meshes, networks) if masked else [None] * len(meshes)  # type: ignore[arg-type]
    for head, mask in zip(heads, masks, strict=True):
        assert head.mesh_image is not None and head.pose is not None
        result = build_texture(rgb, head.mesh_image, size, symmetry=symmetry, mask=mask)
        islands = cached_uv_raster(head.mesh_image.uvs, head.mesh_image.faces, size).island_mask
        boundary, interior = seam_steps(result.texture, result.seen & islands, islands)
        if len(boundary) == 0 or len(interior) == 0:
            continue
        step, reference = float(np.median(boundary)), float(np.median(interior))
        rows.append(
            {
                "photo": path.name,
                "head": head.index,
                "yaw": round(float(head.pose.yaw), 1),
                "seen": round(result.seen_share, 4),
                "boundary_dE": round(step, 3),
                "seen_dE": round(reference, 3),
                "ratio": round(step / max(reference, 1e-6), 3),
            }
        )
    return rows


def summary(rows: list[dict[str, object]]) -> dict[str, object]:
    """Medians of the per-head ratios: all heads, and turned heads."""

    def median_ratio(selected: list[dict[str, object]]) -> float | None:
        values = [float(row["ratio"]) for row in selected]  # type: ignore[arg-type]
        return round(float(np.median(values)), 3) if values else None

    turned = [row for row in rows if abs(float(row["yaw"])) >= TURNED_YAW]  # type: ignore[arg-type]
    return {
        "heads": len(rows),
        "median_ratio": median_ratio(rows),
        "turned_heads": len(turned),
        "turned_median_ratio": median_ratio(turned),
        "median_boundary_dE": round(float(np.median([float(r["boundary_dE"]) for r in rows])), 3)  # type: ignore[arg-type]
        if rows
        else None,
        "median_seen_dE": round(float(np.median([float(r["seen_dE"]) for r in rows])), 3)  # type: ignore[arg-type]
        if rows
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--label", default="")
    parser.add_argument("--no-mask", action="store_true", help="leave the person mask out")
    args = parser.parse_args()
    from headforge.models.runtime import load_default_networks

    networks = load_default_networks()
    symmetry = facemesh_symmetry()
    for folder in args.data:
        rows: list[dict[str, object]] = []
        for path in sorted(folder.glob("*.jpg")):
            for row in measure(path, args.size, symmetry, networks, masked=not args.no_mask):
                rows.append(row)
                print(json.dumps(row))
        print(json.dumps({"label": args.label, "data": folder.name, **summary(rows)}))


if __name__ == "__main__":
    main()
