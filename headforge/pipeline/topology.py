"""The fixed face-mesh topology (triangles, UVs, mirror map, frontal template) and the image-frame mesh.

The asset is generated once by `scripts/build_facemesh_topology.py` from MediaPipe's tessellation
edge list and shipped in the package (`headforge/assets/facemesh_topology.npz`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from headforge.config import PACKAGE_ASSETS
from headforge.errors import AssetError, InvalidLandmarksError
from headforge.pipeline.types import Mesh

TOPOLOGY_PATH = PACKAGE_ASSETS / "facemesh_topology.npz"
NUM_VERTICES = 468
TOPOLOGY_NAME = "facemesh468"


@dataclass(frozen=True)
class FaceMeshTopology:
    """Everything fixed about the 468-vertex face mesh."""

    faces: NDArray[np.int32]  # (852, 3), CCW seen from in front
    uvs: NDArray[np.float32]  # (468, 2) in [0, 1], v up
    mirror: NDArray[np.int32]  # (468,) vertex -> its mirror image across the midline
    template: NDArray[np.float64]  # (468, 3) symmetric frontal face, head frame, meters
    reference: NDArray[np.float32]  # (468, 3) the raw landmarks the template was built from


@lru_cache(maxsize=4)
def load_topology(path: Path = TOPOLOGY_PATH) -> FaceMeshTopology:
    """Read the topology asset once per process."""
    try:
        with np.load(path) as data:
            topology = FaceMeshTopology(
                faces=data["faces"].astype(np.int32),
                uvs=data["uvs"].astype(np.float32),
                mirror=data["mirror"].astype(np.int32),
                template=data["template"].astype(np.float64),
                reference=data["reference"].astype(np.float32),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise AssetError(
            f"face-mesh topology asset {path} is missing or unreadable; rebuild it with "
            "scripts/build_facemesh_topology.py",
            details={"path": str(path)},
        ) from exc
    for array in (topology.faces, topology.uvs, topology.mirror, topology.template):
        array.flags.writeable = False
    return topology


def build_image_mesh(landmarks_3d: NDArray[np.floating]) -> Mesh:
    """The face mesh in the image frame: the 468 landmarks (pixels, z on the x scale) as vertices."""
    points = np.asarray(landmarks_3d, dtype=np.float32)
    if points.shape != (NUM_VERTICES, 3):
        raise InvalidLandmarksError(
            f"the face mesh needs {NUM_VERTICES}×3 landmarks, got shape {points.shape}",
            details={"shape": list(points.shape)},
        )
    if not np.isfinite(points).all():
        raise InvalidLandmarksError("landmarks contain NaN or infinite values")
    topology = load_topology()
    return Mesh(vertices=points.copy(), faces=topology.faces, uvs=topology.uvs, topology=TOPOLOGY_NAME)
