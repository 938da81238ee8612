"""Head pose from 3D landmarks: a rigid similarity fit (Umeyama) to the frontal template.

Angles follow the AFLW2000-3D / 3DDFA convention used by the head-pose tables of VGGHeads,
3DDFA-V2 and 6DRepNet: `Pose_Para` = (pitch, yaw, roll) with R = Rx(pitch) · Ry(yaw) · Rz(-roll)
(right-handed elementary rotations), acting on a model frame with y up and z into the face, and
producing image coordinates with y up and z away from the camera. In plain words, for the person in
the photo: yaw > 0 turns the face toward the image's left (the subject's right), pitch > 0 lifts the
chin (looking up), roll > 0 turns the face clockwise as seen in the image (the subject's left eye,
on the image's right, drops).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from headforge.errors import InvalidLandmarksError
from headforge.pipeline.geometry import umeyama
from headforge.pipeline.types import Mesh, Pose

# AFLW2000's rotation, written in terms of ours (head frame -> image frame with y down, z away):
# R_aflw = _IMAGE_TO_AFLW @ R_ours @ _HEAD_TO_AFLW_MODEL.
_IMAGE_TO_AFLW = np.diag([1.0, -1.0, 1.0])
_HEAD_TO_AFLW_MODEL = np.diag([1.0, 1.0, -1.0])


def rotation_to_angles(rotation: NDArray[np.floating]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees, AFLW2000 convention, from a head-frame -> image-frame rotation."""
    aflw = _IMAGE_TO_AFLW @ np.asarray(rotation, dtype=np.float64) @ _HEAD_TO_AFLW_MODEL
    pitch, yaw, minus_roll = Rotation.from_matrix(aflw).as_euler("XYZ", degrees=True)
    return float(yaw), float(pitch), float(-minus_roll)


def angles_to_rotation(yaw: float, pitch: float, roll: float) -> NDArray[np.float64]:
    """The head-frame -> image-frame rotation for AFLW2000 angles in degrees (inverse of `rotation_to_angles`)."""
    aflw = Rotation.from_euler("XYZ", [pitch, yaw, -roll], degrees=True).as_matrix()
    return _IMAGE_TO_AFLW @ aflw @ _HEAD_TO_AFLW_MODEL


def estimate_pose(
    landmarks_3d: NDArray[np.floating],
    template: NDArray[np.floating] | None = None,
    indices: NDArray[np.integer] | None = None,
) -> Pose:
    """Fit `image = scale * R @ template + t` over `indices` and read yaw, pitch, roll off R.

    `landmarks_3d` are in image pixels (x right, y down, z away from the camera on the x scale).
    Defaults: the face-mesh frontal template (meters, head frame) and all of its vertices (on the
    AFLW2000 sample, dropping the mouth and jaw made the error larger, not smaller).
    """
    from headforge.pipeline.topology import load_topology

    points = np.asarray(landmarks_3d, dtype=np.float64)
    topology = load_topology()
    reference = topology.template if template is None else np.asarray(template, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or points.shape != reference.shape:
        raise InvalidLandmarksError(
            f"expected landmarks of shape {reference.shape}, got {points.shape}",
            details={"shape": list(points.shape)},
        )
    if not np.isfinite(points).all():
        raise InvalidLandmarksError("landmarks contain NaN or infinite values")
    if indices is None:
        indices = np.arange(len(points))
    scale, rotation, translation = umeyama(reference[indices], points[indices])
    if not scale > 0:
        raise InvalidLandmarksError("landmarks are degenerate (all points coincide)")
    yaw, pitch, roll = rotation_to_angles(rotation)
    return Pose(
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        rotation=rotation.astype(np.float32),
        translation=translation.astype(np.float32),
        scale=float(scale),
    )


def to_head_frame(mesh_image: Mesh, pose: Pose) -> Mesh:
    """The image-frame mesh (pixels) in the head frame: meters, +Y up, face toward +Z (glTF), centered
    where the template is centered.

    The inverse similarity maps pixels back to template meters. Image -> head is a proper rotation
    (it includes the 180° turn about x that flips y down/z away into y up/z toward the viewer), so
    faces stay counter-clockwise seen from outside.
    """
    rotation = np.asarray(pose.rotation, dtype=np.float64)
    local = (np.asarray(mesh_image.vertices, dtype=np.float64) - pose.translation) @ rotation / pose.scale
    return Mesh(
        vertices=local.astype(np.float32),
        faces=mesh_image.faces,
        uvs=mesh_image.uvs,
        uv_faces=mesh_image.uv_faces,
        topology=mesh_image.topology,
    )
