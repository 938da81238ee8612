"""Subjects: the photos of one `subject=true` job show one person.

This module is the one place that decides which head of each photo is the subject
(`pick_subject_heads`: the largest face of a photo; a photo without a face is left out with a note),
hands stages the subject's (view, head) pairs (`subject_views`, e.g. for fusing a texture across
views), and writes result.json's `subject` section (`subject_document`). The identity itself is
fitted by the pipeline's stage (the FLAME fit: `flame_stage.fit_subject_heads`), which records it
in `ctx.subject`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from headforge.errors import TooManySubjectPhotosError
from headforge.pipeline.types import Head, StageContext, View

MAX_SUBJECT_PHOTOS = 8


@dataclass
class SubjectPick:
    """What one photo of a subject contributed: how many faces were found, and the head kept."""

    view: int
    filename: str
    faces_found: int
    head: Head | None  # the largest face, or None when the photo has none


def check_subject_photo_count(count: int) -> None:
    """A subject job holds 1..8 photos; more is `too_many_subject_photos` (HTTP 413)."""
    if count > MAX_SUBJECT_PHOTOS:
        raise TooManySubjectPhotosError(
            f"a subject job takes at most {MAX_SUBJECT_PHOTOS} photos of one person, got {count}",
            details={"files": count, "max_files": MAX_SUBJECT_PHOTOS},
        )


def box_area(head: Head) -> float:
    x0, y0, x1, y1 = (float(value) for value in head.detection.box)
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def pick_subject_heads(ctx: StageContext, heads: list[Head]) -> tuple[list[Head], list[SubjectPick]]:
    """One head per view, the largest box (ties: the head source's order, best first); views
    without a face and views with several get a note. Returns the kept heads in view order and
    one pick per view of the capture."""
    picks: list[SubjectPick] = []
    kept: list[Head] = []
    for view in ctx.capture.views:
        found = [head for head in heads if head.view == view.index]
        chosen = max(found, key=box_area) if found else None  # max keeps the first of equal areas
        picks.append(SubjectPick(view.index, view.filename, len(found), chosen))
        if chosen is None:
            ctx.notes.append(
                f"view {view.index} ({view.filename}): no face found; the subject is built from the other photos"
            )
            continue
        if len(found) > 1:
            ctx.notes.append(
                f"view {view.index} ({view.filename}): {len(found)} faces found; the largest is the subject"
            )
        chosen.index = 0
        kept.append(chosen)
    return kept, picks


def subject_views(ctx: StageContext, heads: list[Head]) -> list[tuple[View, Head]]:
    """The subject's (view, head) pairs in view order, for stages that combine the views: the
    photo is `view.rgb`, the head's projected mesh `head.mesh_image` (image pixels)."""
    views = ctx.capture.views
    return [(views[head.view], head) for head in sorted(heads, key=lambda head: head.view)]


def _status(pick: SubjectPick, kept: list[Head]) -> str:
    if pick.head is None:
        return "no_face"
    return "used" if any(head is pick.head for head in kept) else "dropped"


def subject_document(ctx: StageContext, picks: list[SubjectPick], kept: list[Head]) -> dict[str, Any]:
    """result.json's `subject`: each photo's part (its pose and fit residual when its head was
    used), the views used, and the fused identity when the pipeline fitted one."""
    views = []
    for pick in picks:
        status = _status(pick, kept)
        head = pick.head if status == "used" else None
        pose = None if head is None else head.pose
        residual = None if head is None else head.params.get("fit_residual_px")
        views.append(
            {
                "view": pick.view,
                "filename": pick.filename,
                "faces_found": pick.faces_found,
                "status": status,
                "head": None if head is None else head.index,
                "pose": None
                if pose is None
                else {"yaw": round(pose.yaw, 3), "pitch": round(pose.pitch, 3), "roll": round(pose.roll, 3)},
                "fit_residual_px": None if residual is None else round(float(residual), 4),
            }
        )
    identity = ctx.subject
    return {
        "views": views,
        "used_views": [entry["view"] for entry in views if entry["status"] == "used"],
        "identity": None
        if identity is None
        else {
            "model": identity.model,
            "shape": np.round(np.asarray(identity.shape, np.float64), 6).tolist(),
            "views": list(identity.views),
            "fit_residual_px": None if identity.residual_px is None else round(identity.residual_px, 4),
            "fit_iterations": identity.iterations,
        },
    }
