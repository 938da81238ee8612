#!/usr/bin/env python
"""Head-pose mean absolute error on the AFLW2000-3D sample in `../shared/data/aflw2000-sample/`.

For each photo: 468 landmarks from the detect stage (`find_heads`; or, with --label-crops, FaceMesh
on a crop around the labelled landmarks, the usual AFLW2000 protocol), then `estimate_pose`,
compared with `Pose_Para` (pitch, yaw, roll in radians). --label-landmarks fits the labelled 3D
landmarks instead, which measures the template and the angle convention without the network.
Prints a Markdown table and the mean absolute error per angle and overall, in degrees, over the
photos where a face was found. Networks: ONNX from the model repository, else LiteRT.

Usage: python bench/pose_error.py [DATA_DIR] [--label-crops | --label-landmarks] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headforge.models.runtime import DefaultNetworks  # noqa: E402
from headforge.pipeline.pose import estimate_pose  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "aflw2000-sample"
# Face-mesh vertices closest to the 68 iBUG/300W landmarks of `pt3d_68` (for --label-landmarks).
MESH_OF_68 = [
    162,
    234,
    93,
    58,
    172,
    136,
    149,
    148,
    152,
    377,
    378,
    365,
    397,
    288,
    323,
    454,
    389,
    71,
    63,
    105,
    66,
    107,
    336,
    296,
    334,
    293,
    301,
    168,
    197,
    5,
    4,
    75,
    97,
    2,
    326,
    305,
    33,
    160,
    158,
    133,
    153,
    144,
    362,
    385,
    387,
    263,
    373,
    380,
    61,
    39,
    37,
    0,
    267,
    269,
    291,
    405,
    314,
    17,
    84,
    181,
    78,
    82,
    13,
    312,
    308,
    317,
    14,
    87,
]


@dataclass
class PoseSample:
    name: str
    truth: NDArray[np.float64]  # yaw, pitch, roll in degrees
    estimate: NDArray[np.float64]


def read_label(mat_path: Path) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(yaw, pitch, roll) in degrees and the (68, 2) labelled landmarks (x, y of `pt3d_68`)."""
    from scipy.io import loadmat

    label = loadmat(mat_path)
    pitch, yaw, roll = np.degrees(label["Pose_Para"][0, :3].astype(np.float64))
    return np.array([yaw, pitch, roll]), label["pt3d_68"][:2].T.astype(np.float64)


_NETWORKS: dict[str, DefaultNetworks] = {}


def networks() -> DefaultNetworks:
    """The ONNX networks from the model repository, else the original `.tflite` files via LiteRT."""
    if "default" not in _NETWORKS:
        try:
            from headforge.models.runtime import load_default_networks

            _NETWORKS["default"] = load_default_networks()
        except Exception:
            from headforge.config import tflite_source_dir
            from headforge.models.litert import load_litert_networks

            _NETWORKS["default"] = load_litert_networks(tflite_source_dir())
    return _NETWORKS["default"]


def detector_landmarks(rgb: NDArray[np.uint8]) -> NDArray[np.float64] | None:
    """468 landmarks of the most confident head `find_heads` returns, or None when it finds none."""
    from headforge.pipeline.landmarks import find_heads

    heads = find_heads(rgb, networks())
    if not heads or heads[0].landmarks_3d is None:
        return None
    return np.asarray(heads[0].landmarks_3d[:468], dtype=np.float64)


def label_crop_landmarks(rgb: NDArray[np.uint8], labelled: NDArray[np.float64]) -> NDArray[np.float64] | None:
    """468 landmarks from FaceMesh on the ROI of a box around the labelled 68 points (the usual
    AFLW2000 protocol: crops from the labels, so detector misses do not count)."""
    from headforge.pipeline.landmarks import predict_landmarks
    from headforge.pipeline.types import Detection

    keypoints = np.zeros((6, 2), dtype=np.float32)
    keypoints[0] = labelled[36:42].mean(0)  # subject's right eye
    keypoints[1] = labelled[42:48].mean(0)
    box = np.concatenate([labelled.min(0), labelled.max(0)]).astype(np.float32)
    result = predict_landmarks(rgb, [Detection(box=box, score=1.0, keypoints=keypoints)], networks())[0]
    if result.presence < 0.5:
        return None
    return np.asarray(result.landmarks_3d[:468], dtype=np.float64)


def label_landmark_poses(data_dir: Path) -> list[PoseSample]:
    """Poses from the ground-truth 3D landmarks (`pt3d_68`, z flipped to point away from the camera)
    fitted to the template's 68 corresponding vertices: the error of the template and the angle
    convention alone, without the network."""
    from scipy.io import loadmat

    from headforge.pipeline.topology import load_topology

    template = load_topology().template[MESH_OF_68]
    samples = []
    for mat_path in sorted(data_dir.glob("*.mat")):
        truth, _ = read_label(mat_path)
        points = loadmat(mat_path)["pt3d_68"].T.astype(np.float64) * [1.0, 1.0, -1.0]
        pose = estimate_pose(points, template=template)
        samples.append(PoseSample(mat_path.stem, truth, np.array([pose.yaw, pose.pitch, pose.roll])))
    return samples


def evaluate(data_dir: Path, label_crops: bool = False) -> list[PoseSample]:
    """Pose estimates for every labelled photo in `data_dir` (NaN where no face was found)."""
    from PIL import Image

    samples: list[PoseSample] = []
    for mat_path in sorted(data_dir.glob("*.mat")):
        rgb = np.asarray(Image.open(mat_path.with_suffix(".jpg")).convert("RGB"))
        truth, labelled = read_label(mat_path)
        landmarks = label_crop_landmarks(rgb, labelled) if label_crops else detector_landmarks(rgb)
        estimate = np.full(3, np.nan)
        if landmarks is not None:
            pose = estimate_pose(landmarks)
            estimate = np.array([pose.yaw, pose.pitch, pose.roll])
        samples.append(PoseSample(mat_path.stem, truth, estimate))
    return samples


def mean_absolute_error(samples: list[PoseSample]) -> dict[str, float]:
    """MAE per angle and over all three, in degrees, over the photos where a face was found."""
    found = [s for s in samples if np.isfinite(s.estimate).all()]
    if not found:
        return {
            "yaw": float("nan"),
            "pitch": float("nan"),
            "roll": float("nan"),
            "mean": float("nan"),
            "found": 0,
        }
    errors = np.abs(np.array([s.estimate - s.truth for s in found]))
    yaw, pitch, roll = errors.mean(0)
    return {
        "yaw": float(yaw),
        "pitch": float(pitch),
        "roll": float(roll),
        "mean": float(errors.mean()),
        "found": len(found),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--label-landmarks", action="store_true", help="fit the labelled 3D landmarks instead"
    )
    parser.add_argument(
        "--label-crops", action="store_true", help="FaceMesh on crops around the labelled landmarks"
    )
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"no AFLW2000 sample at {args.data_dir}")
    if args.label_landmarks:
        samples, source = label_landmark_poses(args.data_dir), "pt3d_68 labels"
    else:
        source = "FaceMesh on label crops" if args.label_crops else "find_heads"
        samples = evaluate(args.data_dir, label_crops=args.label_crops)
    mae = mean_absolute_error(samples)
    if args.json:
        print(json.dumps({"landmarks": source, "count": len(samples), "mae_deg": mae}, indent=2))
        return
    print(f"landmarks: {source}; face found in {mae['found']} of {len(samples)} photos\n")
    print("| photo | yaw (label / ours) | pitch (label / ours) | roll (label / ours) |")
    print("|---|---|---|---|")
    for s in samples:
        cells = [f"{t:.1f} / {e:.1f}" for t, e in zip(s.truth, s.estimate, strict=True)]
        print(f"| {s.name} | " + " | ".join(cells) + " |")
    bias = np.nanmean([s.estimate - s.truth for s in samples], axis=0)
    print(f"\nmean signed error (degrees): yaw {bias[0]:.2f}, pitch {bias[1]:.2f}, roll {bias[2]:.2f}")
    print(
        f"MAE (degrees): yaw {mae['yaw']:.2f}, pitch {mae['pitch']:.2f}, roll {mae['roll']:.2f}, "
        f"mean {mae['mean']:.2f}"
    )


if __name__ == "__main__":
    main()
