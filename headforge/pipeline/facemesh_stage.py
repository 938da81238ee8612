"""The MediaPipe head source and the `facemesh` pipeline's fit stage.

`mediapipe_heads` is the head source of every pipeline that starts from MediaPipe: the full-range
BlazeFace detector on the whole photo plus tiles, then FaceMesh (468 landmarks, two passes, no
Iris). `fit_facemesh_heads` turns the landmarks into the face mesh and a pose from a rigid fit.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from headforge.errors import InvalidImageError
from headforge.pipeline.types import Head, StageContext, View


def mediapipe_heads(ctx: StageContext, view: View) -> list[Head]:
    """Heads of one view with landmarks, best first (none, with a note, when the photo is too small
    to hold a face)."""
    from headforge.pipeline.landmarks import find_heads

    try:
        heads = find_heads(view.rgb, ctx.models, max_heads=ctx.options.max_heads, notes=ctx.notes)
    except InvalidImageError as error:  # decodable, but too small to hold a face
        ctx.notes.append(f"{error.message}; nothing to reconstruct")
        return []
    for head in heads:
        head.view = view.index
    return heads


def fit_facemesh(head: Head, rgb: NDArray[np.uint8] | None = None) -> None:
    """One head: the 468 landmarks are the mesh; pose from a rigid fit (`rgb` is not needed)."""
    from headforge.pipeline.pose import estimate_pose, to_head_frame
    from headforge.pipeline.topology import NUM_VERTICES, build_image_mesh

    if head.landmarks_3d is None:
        raise ValueError("fit_facemesh needs landmarks_3d")
    landmarks = head.landmarks_3d[:NUM_VERTICES]
    head.mesh_image = build_image_mesh(landmarks)
    head.pose = estimate_pose(landmarks)
    head.mesh = to_head_frame(head.mesh_image, head.pose)


def fit_facemesh_heads(ctx: StageContext, heads: list[Head]) -> None:
    """The `facemesh` fit stage over every head of the capture."""
    for head in heads:
        fit_facemesh(head)


def facemesh_symmetry() -> NDArray[np.int32]:
    """The face mesh's vertex → mirror-vertex map."""
    from headforge.pipeline.topology import load_topology

    return load_topology().mirror
