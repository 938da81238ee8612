"""The data contract every stage shares: one `Head` record per detected head.

Coordinates: unless a field says otherwise, 2D positions are in original-image pixels
(x right, y down, origin at the top-left corner of the top-left pixel, after EXIF orientation).
3D landmark z is on the same pixel scale as x, larger z further from the camera (MediaPipe's
convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from headforge.models.runtime import ModelSet
    from headforge.pipeline.options import ReconstructOptions
    from headforge.pipeline.rig import MorphTargets, SplatBinding

FloatArray = NDArray[np.float32]
IntArray = NDArray[np.int32]


@dataclass
class DecodedImage:
    """An upload decoded to RGB8, with what was done to get there."""

    rgb: NDArray[np.uint8]  # (H, W, 3)
    source_format: str  # "JPEG", "PNG", ...
    source_mode: str  # PIL mode before conversion: "RGB", "L", "CMYK", "I;16", "RGBA", ...
    exif_orientation: int = 1  # the EXIF orientation tag that was applied (1 = none)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


@dataclass
class Detection:
    """A face box from the detector, in original-image pixels."""

    box: FloatArray  # (4,) x0, y0, x1, y1
    score: float
    # (6, 2) MediaPipe keypoints: right eye, left eye, nose tip, mouth center,
    # right ear tragion, left ear tragion (subject's right/left).
    keypoints: FloatArray


@dataclass
class Pose:
    """Head pose in degrees, AFLW2000 convention, plus the rigid fit it came from."""

    yaw: float
    pitch: float
    roll: float
    rotation: FloatArray  # (3, 3) canonical head frame -> image frame
    translation: FloatArray  # (3,) in image pixels
    scale: float  # canonical units -> pixels


@dataclass
class Mesh:
    """A triangle mesh with per-vertex UVs.

    `vertices` are in the frame the owning field names (`Head.mesh_image`: image pixels;
    `Head.mesh`: head frame in meters). `uv_faces` is set when UV seams split vertices (FLAME, templates):
    then `uvs` is indexed by `uv_faces`, otherwise by `faces`.
    """

    vertices: FloatArray  # (V, 3)
    faces: IntArray  # (F, 3), counter-clockwise seen from outside
    uvs: FloatArray  # (T, 2) in [0, 1], v up (OpenGL/glTF-after-flip convention documented by package stage)
    uv_faces: IntArray | None = None  # (F, 3) or None when uvs are per-vertex
    topology: str = "facemesh468"
    morph_targets: MorphTargets | None = None  # animation targets in this mesh's frame (FLAME heads)


SPLAT_SOURCES = ("sampled", "learned")
MAX_SH_DEGREE = 3


@dataclass
class Splats:
    """2D Gaussians (linear values; the PLY writer applies logs and logits).

    `source` says where they came from: `sampled` on the textured mesh by the default splat step,
    or `learned` (decoded by a network, e.g. KaoLRM's). `sh_rest` holds the optional higher
    spherical-harmonic coefficients beyond the base color: (N, (d+1)^2 - 1, 3) for degree d in 1..3,
    coefficient-major with RGB last; None means degree 0 (colors only).
    """

    means: FloatArray  # (N, 3)
    normals: FloatArray  # (N, 3)
    colors: FloatArray  # (N, 3) RGB in [0, 1]
    opacities: FloatArray  # (N,) in (0, 1)
    scales: FloatArray  # (N, 3) linear, third axis along the normal (epsilon)
    rotations: FloatArray  # (N, 4) unit quaternion w, x, y, z
    binding: SplatBinding | None = None  # each splat's triangle, barycentrics and local frame
    sh_rest: FloatArray | None = None  # (N, K, 3), K = 3, 8 or 15
    source: str = "sampled"

    def __post_init__(self) -> None:
        if self.source not in SPLAT_SOURCES:
            raise ValueError(f"splat source must be one of {SPLAT_SOURCES}, not {self.source!r}")
        if self.sh_rest is not None:
            rest = np.asarray(self.sh_rest)
            if rest.ndim != 3 or rest.shape[0] != len(self.means) or rest.shape[2] != 3:
                raise ValueError(f"sh_rest must be (N, K, 3) with N = {len(self.means)}, got {rest.shape}")
            if rest.shape[1] not in {(d + 1) ** 2 - 1 for d in range(1, MAX_SH_DEGREE + 1)}:
                raise ValueError(f"sh_rest has {rest.shape[1]} coefficients; degree 1..3 has 3, 8 or 15")

    @property
    def sh_degree(self) -> int:
        """The spherical-harmonic degree: 0 without `sh_rest`, else 1..3."""
        if self.sh_rest is None:
            return 0
        return round((np.asarray(self.sh_rest).shape[1] + 1) ** 0.5) - 1


@dataclass
class Head:
    """Everything known about one head; stages fill fields in order."""

    index: int
    detection: Detection
    view: int = 0  # which photo of the capture the head was found in (0 for a single photo)
    landmarks_2d: FloatArray | None = None  # (K, 2)
    landmarks_3d: FloatArray | None = None  # (K, 3)
    landmark_score: float | None = None
    pose: Pose | None = None
    params: dict[str, Any] = field(default_factory=dict)  # model parameters (FLAME, ...)
    mesh_image: Mesh | None = None  # the mesh in the image frame (pixels), for texturing and previews
    mesh: Mesh | None = None  # the exported mesh, in the head frame (meters, +Y up, face toward +Z)
    texture: NDArray[np.uint8] | None = None  # (S, S, 3) RGB
    splats: Splats | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # kind -> file name
    registration: dict[str, Any] | None = None  # the topology= template fit (pipeline/retopology.py)


@dataclass
class View:
    """One photo of a capture: its upload name and bytes, and the decoded image."""

    index: int
    filename: str
    data: bytes
    image: DecodedImage

    @property
    def rgb(self) -> NDArray[np.uint8]:
        return self.image.rgb


@dataclass
class Capture:
    """The runner's unit of work: 1..N photos. `subject` says they all show one person, so the stages
    see every view's heads together; otherwise a capture holds one photo."""

    views: list[View]
    subject: bool = False


@dataclass
class SubjectIdentity:
    """The identity a stage fitted across a subject's views (`subject=true`): one shape vector
    shared by the heads of `views`, and the fused fit's residual (pipeline/subject.py)."""

    model: str  # "flame"
    shape: NDArray[np.float64]  # β, shared by every fused view's head
    views: list[int]  # the views whose heads were fused, ascending
    residual_px: float | None = None  # mean 2D landmark distance over the fused views
    iterations: int | None = None


@dataclass
class StageContext:
    """What a head source or a stage may use besides the heads: the job's options, the model set
    (networks by name, opened on first use; the ones taken are listed in result.json), the capture,
    a list of notes that end up in result.json, and the subject's fused identity once a stage fits
    one."""

    options: ReconstructOptions
    models: ModelSet
    capture: Capture
    notes: list[str] = field(default_factory=list)
    subject: SubjectIdentity | None = None  # set by a stage that fuses a subject's identity

    def image(self, head: Head) -> NDArray[np.uint8]:
        """The RGB photo `head` was found in."""
        return self.capture.views[head.view].rgb
