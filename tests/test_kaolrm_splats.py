"""The `kaolrm` stage's learned splats without networks: hand-made Gaussian rows (as KaoLRM's
Gaussian decoder gives them, in the placed frame p = s · FLAME + t) → head-frame `Splats` → PLY.

Each expectation is computed here from KaoLRM's conventions (public code, seed-formats.md §B), not
read back from the stage: culling keeps the int(N / 1.8) points of largest p_z for mono only; the
rotation loses the global pose; the tangent scales lose s; the normal axis is an epsilon; the PLY
holds the SH DC term, logit opacity and log scales."""

from __future__ import annotations

import io

import numpy as np
import pytest
from plyfile import PlyData
from scipy.spatial.transform import Rotation

from headforge.pipeline.kaolrm_stage import KaoLRMHead, _Points, learned_splats, project
from headforge.pipeline.package import SH_C0, splats_ply_bytes
from headforge.pipeline.splats import NORMAL_SCALE_RATIO

SCALE = 0.8
GLOBAL_POSE = np.array([0.1, -0.4, 0.2])


def _head() -> KaoLRMHead:
    raw = np.zeros(160, np.float32)
    raw[150:153] = GLOBAL_POSE
    raw[156] = SCALE
    raw[157:160] = [0.01, -0.02, 0.3]
    return KaoLRMHead(raw=raw, planes=np.zeros((3, 1, 1, 1), np.float32), origin=(10.0, 20.0), side=200.0)


def _rows(count: int, rng: np.random.Generator) -> np.ndarray:
    """Activated decoder rows: opacity | 3 scales | quaternion w, x, y, z | RGB (saturated sigmoid)."""
    quats = rng.normal(size=(count, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    return np.column_stack(
        [
            rng.uniform(0.05, 0.95, count),
            rng.uniform(0.001, 0.02, (count, 3)),
            quats,
            rng.uniform(-0.001, 1.001, (count, 3)),
        ]
    ).astype(np.float32)


def _points(count: int, rng: np.random.Generator) -> _Points:
    placed = rng.normal(scale=0.1, size=(count, 3))
    return _Points(placed=placed, head=placed / SCALE, triangles=None, barycentrics=None)


@pytest.mark.parametrize(("variant", "count", "kept"), [("mono", 8000, 4444), ("mono", 5023, 2790),
                                                        ("multiview", 8000, 8000)])  # fmt: skip
def test_learned_splats_follow_kaolrm(variant: str, count: int, kept: int) -> None:
    rng = np.random.default_rng(count)
    rows, points = _rows(count, rng), _points(count, rng)
    splats = learned_splats(rows, points, _head(), variant, np.zeros((5023, 3)), np.zeros((1, 3), np.int32))
    assert splats.source == "learned" and len(splats.means) == kept

    # Mono: the kept points are exactly the `kept` largest p_z; multiview keeps all, in order.
    order = np.argsort(-points.placed[:, 2], kind="stable")[:kept]
    chosen = np.sort(order) if variant == "mono" else np.arange(count)
    np.testing.assert_allclose(splats.means, points.head[chosen], atol=1e-6)
    if variant == "mono":
        assert points.placed[chosen, 2].min() >= np.delete(points.placed[:, 2], chosen).max()

    kept_rows = rows[chosen].astype(np.float64)
    np.testing.assert_allclose(splats.opacities, kept_rows[:, 0], rtol=1e-6)
    np.testing.assert_allclose(splats.colors, np.clip(kept_rows[:, 8:11], 0, 1), atol=1e-7)
    # Tangent scales from the placed frame (s units per metre) to metres; the normal axis an epsilon.
    np.testing.assert_allclose(splats.scales[:, :2], kept_rows[:, 1:3] / SCALE, rtol=1e-5)
    np.testing.assert_allclose(
        splats.scales[:, 2], NORMAL_SCALE_RATIO * splats.scales[:, :2].max(axis=1), rtol=1e-5
    )
    # Rotation: R(global)ᵀ · R(q), compared as matrices (q and −q are the same rotation).
    placed = Rotation.from_quat(kept_rows[:, [5, 6, 7, 4]]).as_matrix()
    expected = Rotation.from_rotvec(GLOBAL_POSE).as_matrix().T @ placed
    got = Rotation.from_quat(splats.rotations[:, [1, 2, 3, 0]].astype(np.float64)).as_matrix()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(splats.normals, expected[:, :, 2], atol=1e-5)

    # The PLY: SH DC (c − 0.5) / C0, logit opacity, log scales.
    ply = PlyData.read(io.BytesIO(splats_ply_bytes(splats)))["vertex"]
    dc = np.stack([ply[f"f_dc_{i}"] for i in range(3)], axis=1)
    np.testing.assert_allclose(dc, (np.clip(kept_rows[:, 8:11], 0, 1) - 0.5) / SH_C0, atol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-np.asarray(ply["opacity"]))), kept_rows[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(ply["scale_0"])), kept_rows[:, 1] / SCALE, rtol=1e-4)


def test_projection_is_kaolrms_pinhole_at_distance_two() -> None:
    """The crop centre is where the optical axis meets it; a point at p_z = 0 moves f · x / 2 of the
    crop side; nearer points (larger p_z) move more and get a smaller image z."""
    focal, origin, side = 20.0, (10.0, 20.0), 200.0
    points = np.array([[0.0, 0.0, 0.0], [0.01, 0.02, 0.0], [0.01, 0.0, 0.5]])
    pixels = project(points, focal, origin, side)
    np.testing.assert_allclose(pixels[0], [110.0, 120.0, 0.0])
    np.testing.assert_allclose(pixels[1, :2], [110.0 + 200 * 20 * 0.01 / 2, 120.0 - 200 * 20 * 0.02 / 2])
    assert pixels[2, 0] - 110.0 == pytest.approx(200 * 20 * 0.01 / 1.5)
    assert pixels[2, 2] < pixels[0, 2]
