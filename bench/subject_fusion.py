#!/usr/bin/env python
"""Subject fusion: how consistent one person's identity is across photos, and what a subject costs.

(b) Cross-view spread of β (KaoLRM's Var(β) = 1/N Σ ‖β_i − β̄‖², over the 100 shape components):
    - synthetic: a known identity at several yaws (tests/subject_synthetic.py: per-view expression,
      jaw and pose, landmark noise growing with the turn), each view fitted alone (`fit_flame`)
      against the fused fit (`fit_flame_subject`, one β for all views). The fused fit has one β,
      so its spread is zero by construction; what it is compared on is the error to the truth
      (‖β − β_true‖², mean and worst single view against the fused β) and the spread between the
      fused fits of two disjoint halves of the views. Also timed: both fits, same run.
    - real photos (../shared/data/subjects): the single-view spread of each person's photos and the
      fused fit's residual against the single fits', with whatever FLAME is imported, else the
      synthetic FLAME of the tests (random bases: its β are not a real person's identity).
(d) Creation time of a subject of 4 photos (`reconstruct_capture`, pipeline flame, subject=true,
    default options) against the same 4 photos as 4 one-photo jobs, in the same run.

Usage: OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python bench/subject_fusion.py [--trials 20] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from headforge.pipeline.flame_fit import FitSettings, FlameLandmarkModel, fit_flame, fit_flame_subject  # noqa: E402

SUBJECTS = ROOT.parent / "shared" / "data" / "subjects"


def variance(betas: np.ndarray) -> float:
    """KaoLRM's cross-view variance: 1/N Σ ‖β_i − β̄‖²."""
    return float(np.mean(np.sum((betas - betas.mean(axis=0)) ** 2, axis=1)))


def _asset() -> tuple[Path, str]:
    """The imported FLAME asset, or the tests' synthetic one written to a temporary folder."""
    from headforge.models.flame_import import flame_asset_path, flame_unavailable_reason

    if flame_unavailable_reason() is None:
        return flame_asset_path(), "imported FLAME"
    from flame_synthetic import imported_synthetic_flame

    path = imported_synthetic_flame(Path(tempfile.mkdtemp(prefix="headforge-bench-")))[1]
    os.environ["HEADFORGE_FLAME_ASSET"] = str(path)
    return path, "synthetic FLAME (tests/flame_synthetic.py; no real FLAME is imported here)"


def synthetic_spread(
    model: FlameLandmarkModel, yaws: list[float], trials: int, noise_px: float
) -> dict[str, Any]:
    from subject_synthetic import subject_views

    settings = FitSettings(landmark_sigma_m=0.001)
    rows: dict[str, list[float]] = {
        key: []
        for key in (
            "single_var",
            "single_err_mean",
            "single_err_worst",
            "fused_err",
            "halves_var",
            "single_ms",
            "fused_ms",
        )
    }
    for trial in range(trials):
        rng = np.random.default_rng(1000 + trial)
        truth = rng.normal(0, 1, model.num_shape)
        views = subject_views(model, truth, yaws, rng, noise_px=noise_px)
        start = time.perf_counter()
        singles = np.stack([fit.shape for fit in fit_flame(model, views.landmarks, settings)])
        rows["single_ms"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        fused = fit_flame_subject(model, views.landmarks, settings).shape
        rows["fused_ms"].append((time.perf_counter() - start) * 1000)
        errors = np.sum((singles - truth) ** 2, axis=1)
        rows["single_var"].append(variance(singles))
        rows["single_err_mean"].append(float(errors.mean()))
        rows["single_err_worst"].append(float(errors.max()))
        rows["fused_err"].append(float(np.sum((fused - truth) ** 2)))
        halves = [
            fit_flame_subject(model, views.landmarks[part], settings).shape
            for part in (slice(0, None, 2), slice(1, None, 2))
        ]
        rows["halves_var"].append(variance(np.stack(halves)))
    summary = {key: float(np.mean(values)) for key, values in rows.items()}
    summary["fused_better_than_worst"] = float(
        np.mean(np.array(rows["fused_err"]) < np.array(rows["single_err_worst"]))
    )
    summary["fused_better_than_mean"] = float(
        np.mean(np.array(rows["fused_err"]) < np.array(rows["single_err_mean"]))
    )
    return summary


def _largest_landmarks(rgb: np.ndarray, networks: Any) -> np.ndarray | None:
    from headforge.pipeline.landmarks import find_heads

    heads = find_heads(rgb, networks)
    if not heads:
        return None
    head = max(
        heads,
        key=lambda h: float(
            (h.detection.box[2] - h.detection.box[0]) * (h.detection.box[3] - h.detection.box[1])
        ),
    )
    return np.asarray(head.landmarks_3d, np.float64)


def real_spread(model: FlameLandmarkModel, networks: Any) -> list[dict[str, Any]]:
    from headforge.pipeline.decode import decode_image

    rows = []
    for person in sorted(path for path in SUBJECTS.iterdir() if path.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        found = [(p.name, _largest_landmarks(decode_image(p.read_bytes()).rgb, networks)) for p in photos]
        used = [(name, marks) for name, marks in found if marks is not None]
        landmarks = np.stack([marks for _, marks in used])
        singles = fit_flame(model, landmarks)
        fused = fit_flame_subject(model, landmarks)
        rows.append(
            {
                "person": person.name,
                "photos": [name for name, _ in used],
                "single_var": variance(np.stack([fit.shape for fit in singles])),
                "single_residual_px": float(np.mean([fit.residual_px for fit in singles])),
                "fused_residual_px": fused.residual_px,
                "fused_view_residual_px": [fit.residual_px for fit in fused.views],
            }
        )
    return rows


def creation_time(networks: Any, repeats: int) -> dict[str, Any]:
    from headforge.pipeline.run import ReconstructOptions, reconstruct_capture

    photos = [(p.name, p.read_bytes()) for p in sorted((SUBJECTS / "obama").glob("*.jpg"))][:4]
    subject_options = ReconstructOptions(pipeline="flame", subject=True)
    single_options = ReconstructOptions(pipeline="flame")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        reconstruct_capture(photos, subject_options, out / "warm", networks=networks)  # warm-up
        subject_s, separate_s, fits = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            document = reconstruct_capture(photos, subject_options, out / "subject", networks=networks)
            subject_s.append(time.perf_counter() - start)
            fits.append(document["timings_ms"].get("fit", 0.0))
            start = time.perf_counter()
            for index, photo in enumerate(photos):
                reconstruct_capture([photo], single_options, out / f"single{index}", networks=networks)
            separate_s.append(time.perf_counter() - start)
    return {
        "photos": len(photos),
        "subject_s": float(np.median(subject_s)),
        "separate_s": float(np.median(separate_s)),
        "ratio_subject_to_separate": float(np.median(subject_s) / np.median(separate_s)),
        "subject_fit_ms": float(np.median(fits)),
        "used_views": document["subject"]["used_views"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--yaws", default="-60,-30,0,30,60", help="degrees, one synthetic view each")
    parser.add_argument("--noise", type=float, default=1.0, help="landmark noise, px (x, y; z gets 3x)")
    parser.add_argument("--repeats", type=int, default=3, help="creation-time runs (median)")
    parser.add_argument("--skip-photos", action="store_true", help="synthetic part only (no networks)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from headforge.pipeline.flame_stage import load_model

    asset_path, asset_kind = _asset()
    model = load_model(asset_path)
    yaws = [float(value) for value in args.yaws.split(",")]
    report: dict[str, Any] = {"asset": asset_kind, "threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    report["synthetic"] = {
        "yaws": yaws,
        "trials": args.trials,
        "noise_px": args.noise,
        **synthetic_spread(model, yaws, args.trials, args.noise),
    }
    if not args.skip_photos and SUBJECTS.is_dir():
        from headforge.models.runtime import load_model_set

        networks = load_model_set()
        report["photos"] = real_spread(model, networks)
        report["creation"] = creation_time(networks, args.repeats)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    s = report["synthetic"]
    print(f"asset: {asset_kind}; threads: {report['threads']}")
    print(f"(b) synthetic, {args.trials} subjects x {len(yaws)} views at yaws {yaws}, noise {args.noise} px")
    print(f"    single-view Var(beta) across views     {s['single_var']:.3f}   fused: 0 (one beta)")
    print(
        f"    |beta - truth|^2  single mean {s['single_err_mean']:.3f}  single worst {s['single_err_worst']:.3f}"
        f"  fused {s['fused_err']:.3f}  (fused/worst {s['fused_err'] / s['single_err_worst']:.2f},"
        f" fused/mean {s['fused_err'] / s['single_err_mean']:.2f})"
    )
    print(
        f"    fused better than worst view in {s['fused_better_than_worst']:.0%}, than the mean in"
        f" {s['fused_better_than_mean']:.0%} of subjects"
    )
    print(f"    Var(beta) between fused halves         {s['halves_var']:.3f}")
    print(
        f"    fit time: singles (batched) {s['single_ms']:.1f} ms, fused {s['fused_ms']:.1f} ms"
        f" (ratio {s['fused_ms'] / s['single_ms']:.2f})"
    )
    for row in report.get("photos", []):
        print(
            f"(b) photos {row['person']} ({len(row['photos'])}): single-view Var(beta) {row['single_var']:.3f};"
            f" residual single {row['single_residual_px']:.2f} px, fused {row['fused_residual_px']:.2f} px"
        )
    if "creation" in report:
        c = report["creation"]
        print(
            f"(d) subject of {c['photos']} photos (flame, defaults): {c['subject_s']:.2f} s; as {c['photos']}"
            f" one-photo jobs {c['separate_s']:.2f} s; ratio {c['ratio_subject_to_separate']:.2f};"
            f" fused fit {c['subject_fit_ms']:.0f} ms"
        )


if __name__ == "__main__":
    main()
