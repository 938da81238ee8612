#!/usr/bin/env python
"""Head-pose mean absolute error on the AFLW2000-3D sample in `../shared/data/aflw2000-sample/`.

For each photo: 468 landmarks from the detect stage (`find_heads`; or, with --label-crops, FaceMesh
on a crop around the labelled landmarks, the usual AFLW2000 protocol), then `estimate_pose`,
compared with `Pose_Para` (pitch, yaw, roll in radians). --label-landmarks fits the labelled 3D
landmarks instead, which measures the template and the angle convention without the network.
--synthetic needs no labels: the astronaut's own textured face mesh is rendered (orthographic) at
known yaw and pitch, and the pipeline's pose is compared with those angles (a mask with open eyes and
mouth and no hair or ears, so only a rough stand-in for photos, but its ground truth is exact).
Prints a Markdown table and the mean absolute error per angle and overall, in degrees, over the
photos where a face was found. Networks: ONNX from the model repository, else LiteRT.

Usage: python bench/pose_error.py [DATA_DIR] [--label-crops | --label-landmarks | --synthetic] [--json]
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

from headforge.models.runtime import ModelSet  # noqa: E402
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


_NETWORKS: dict[str, ModelSet] = {}


def networks() -> ModelSet:
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


SYNTHETIC_YAWS = (-60, -45, -30, -15, 0, 15, 30, 45, 60)
SYNTHETIC_PITCHES = (-20, 0, 20)


def synthetic_poses(tile: int = 256, canvas: int = 448) -> list[PoseSample]:
    """Poses of renders of the astronaut's face at known angles (roll 0): her landmarks, texture and
    head-frame mesh from the pipeline's own stages, turned by `angles_to_rotation(yaw, pitch, 0)`, drawn
    by the preview rasterizer into a `tile`-pixel square centred on a grey `canvas`, then `find_heads`
    and `estimate_pose` as for a photo. The head-frame mesh is the landmarks aligned to the template,
    so an exact landmark network would give the render's angles back."""
    from skimage import data

    from headforge.pipeline.pose import angles_to_rotation, to_head_frame
    from headforge.pipeline.preview import render_textured
    from headforge.pipeline.texture import unwrap_texture
    from headforge.pipeline.topology import build_image_mesh, load_topology
    from headforge.pipeline.types import Mesh

    rgb = data.astronaut()
    landmarks = detector_landmarks(rgb)
    if landmarks is None:
        raise SystemExit("no face found on the astronaut")
    mesh_image = build_image_mesh(landmarks.astype(np.float32))
    texture, _ = unwrap_texture(rgb, mesh_image, 1024, symmetry=load_topology().mirror)
    head = to_head_frame(mesh_image, estimate_pose(landmarks))
    # Image frame (y down, z away) -> render view space (y up, z toward the viewer).
    image_to_view = np.diag([1.0, -1.0, -1.0])
    grey = 120
    samples = []
    for yaw in SYNTHETIC_YAWS:
        for pitch in SYNTHETIC_PITCHES:
            rotation = image_to_view @ angles_to_rotation(yaw, pitch, 0.0)
            turned = Mesh(
                vertices=(np.asarray(head.vertices, np.float64) @ rotation.T).astype(np.float32),
                faces=head.faces,
                uvs=head.uvs,
                uv_faces=head.uv_faces,
                topology=head.topology,
            )
            picture = np.full((canvas, canvas, 3), grey, dtype=np.uint8)
            start = (canvas - tile) // 2
            picture[start : start + tile, start : start + tile] = render_textured(
                turned, texture, tile, yaw_degrees=0.0, background=(grey, grey, grey)
            )
            found = detector_landmarks(picture)
            estimate = np.full(3, np.nan)
            if found is not None:
                pose = estimate_pose(found)
                estimate = np.array([pose.yaw, pose.pitch, pose.roll])
            samples.append(
                PoseSample(f"yaw {yaw:+d} pitch {pitch:+d}", np.array([yaw, pitch, 0.0]), estimate)
            )
    return samples


def yaw_gain(samples: list[PoseSample]) -> float:
    """Least-squares slope of estimated against true yaw (through 0): 1 for an unbiased estimate,
    below 1 when turned heads come out less turned than they are."""
    found = [s for s in samples if np.isfinite(s.estimate).all()]
    truth = np.array([s.truth[0] for s in found])
    estimate = np.array([s.estimate[0] for s in found])
    return float(estimate @ truth / (truth @ truth))


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
    parser.add_argument(
        "--synthetic", action="store_true", help="renders of the astronaut's face at known angles"
    )
    args = parser.parse_args()
    if args.synthetic:
        samples, source = synthetic_poses(), "find_heads on synthetic renders"
    elif not args.data_dir.is_dir():
        raise SystemExit(f"no AFLW2000 sample at {args.data_dir}")
    elif args.label_landmarks:
        samples, source = label_landmark_poses(args.data_dir), "pt3d_68 labels"
    else:
        source = "FaceMesh on label crops" if args.label_crops else "find_heads"
        samples = evaluate(args.data_dir, label_crops=args.label_crops)
    mae = mean_absolute_error(samples)
    gain = yaw_gain(samples) if mae["found"] else float("nan")
    if args.json:
        report = {"landmarks": source, "count": len(samples), "mae_deg": mae, "yaw_gain": gain}
        print(json.dumps(report, indent=2))
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
    print(f"yaw gain (slope of estimated on true yaw): {gain:.2f}")


if __name__ == "__main__":
    main()
