"""`result.json` as Pydantic models; its JSON Schema (`result.schema.json`) is generated from them.

    python -m headforge.schemas.models   # rewrites headforge/schemas/result.schema.json

The checked-in file is what the API serves at /v1/schemas/result and what `validate_result`
checks against; tests/test_result_schema.py fails when it and these models drift apart.

A pipeline with its own model parameters adds a params model here (like `FlameParams`), puts it in
`HeadParams`, and adds a row to `PIPELINE_PARAMS` so its heads are checked against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue

from headforge.pipeline.options import ReconstructOptions

SCHEMA_PATH = Path(__file__).parent / "result.schema.json"
SCHEMA_ID = "https://github.com/headforge/headforge/schemas/result.schema.json"

Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
Point2 = Annotated[list[float], Field(min_length=2, max_length=2)]
Point3 = Annotated[list[float], Field(min_length=3, max_length=3)]
Point6 = Annotated[list[float], Field(min_length=6, max_length=6)]
ArtifactName = Annotated[
    str,
    Field(
        pattern=r"^(v[0-9]+_)?(h[0-9]+(\.glb|\.obj|\.mtl|_texture\.png|_splats\.ply|_splats_binding\.npz)|preview\.png)$",
        description="h<index>.<ext> per head (v<view>_ first in a capture of several views), preview.png per view.",
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    filename: str
    bytes: Annotated[int, Field(ge=1)]
    sha256: Sha256


class Image(_Strict):
    width: Annotated[int, Field(ge=1, description="Width after EXIF orientation.")]
    height: Annotated[int, Field(ge=1, description="Height after EXIF orientation.")]
    format: Literal["JPEG", "PNG", "WEBP", "BMP", "TIFF"]
    mode: Annotated[
        str,
        Field(description="Pillow pixel mode before conversion to RGB8 (RGB, L, CMYK, I;16, RGBA, P, ...)."),
    ]
    exif_orientation: Annotated[
        int, Field(ge=1, le=8, description="The EXIF orientation tag that was applied; 1 means none.")
    ]


class ViewRecord(_Strict):
    """One photo of a capture of several views."""

    index: Annotated[int, Field(ge=0)]
    source: Source
    image: Image


class Pose(_Strict):
    yaw: Annotated[float, Field(ge=-180, le=180, description="Degrees, AFLW2000 convention.")]
    pitch: Annotated[float, Field(ge=-180, le=180, description="Degrees, AFLW2000 convention.")]
    roll: Annotated[float, Field(ge=-180, le=180, description="Degrees, AFLW2000 convention.")]
    rotation: Annotated[
        list[Point3],
        Field(min_length=3, max_length=3, description="Head frame to image frame rotation (rows)."),
    ]
    translation: Annotated[Point3, Field(description="Image pixels.")]
    scale: Annotated[float, Field(gt=0, description="Pixels per head-frame meter.")]


class MeshRecord(_Strict):
    topology: str
    vertices: Annotated[int, Field(ge=3)]
    faces: Annotated[int, Field(ge=1)]


class NoParams(_Strict):
    """No model parameters (the `facemesh` pipeline)."""


class FlameParams(_Strict):
    """One head's FLAME fit. FLAME frame: meters, +Y up, face toward +Z; image frame: pixels, z on the
    x scale; image = scale_px_per_m · rotation · X + translation_px."""

    image_size: Annotated[
        list[Annotated[int, Field(ge=1)]],
        Field(min_length=2, max_length=2, description="Width and height of the image the fit is in."),
    ]
    model: Literal["flame"]
    shape: Annotated[
        list[float],
        Field(
            min_length=100,
            max_length=100,
            description="β: FLAME's first 100 shape components, in standard deviations.",
        ),
    ]
    expression: Annotated[
        list[float],
        Field(
            min_length=50,
            max_length=50,
            description="ψ: FLAME's first 50 expression components, in standard deviations.",
        ),
    ]
    jaw_pose: Annotated[Point3, Field(description="Jaw rotation, axis-angle in radians.")]
    neck_pose: Annotated[
        Point3,
        Field(
            description="Neck rotation, axis-angle in radians (at rest: the similarity carries the head's rotation)."
        ),
    ]
    eye_pose: Annotated[
        Point6, Field(description="Left then right eye rotations, axis-angles in radians (at rest).")
    ]
    rotation: Annotated[
        list[Point3],
        Field(min_length=3, max_length=3, description="FLAME frame to image frame rotation (rows)."),
    ]
    translation_px: Annotated[Point3, Field(description="Where FLAME's origin lands in the image, pixels.")]
    scale_px_per_m: Annotated[float, Field(gt=0, description="Image pixels per FLAME meter.")]
    fit_residual_px: Annotated[
        float, Field(ge=0, description="Mean 2D distance between fitted and detected landmarks, pixels.")
    ]
    fit_iterations: Annotated[int, Field(ge=0, description="Levenberg-Marquardt iterations run.")]
    morph_targets: Annotated[
        list[str] | None,
        Field(
            description="The GLB's morph target names, in order: expression_0 … expression_{K-1} (ψ_k added to the "
            "fit), then jaw_open (the jaw opened by 0.35 rad about x from the fit)."
        ),
    ] = None


class VGGHeadsParams(_Strict):
    """One head's FLAME parameters as the VGGHeads network predicts them (no fit). FLAME frame: meters,
    +Y up, face toward +Z; image = scale_px_per_m · rotation · (X + 0.05 ẑ) + translation_px."""

    model: Literal["vggheads-flame"]
    image_size: Annotated[
        list[Annotated[int, Field(ge=1)]],
        Field(min_length=2, max_length=2, description="Width and height of the photo the head is in."),
    ]
    shape: Annotated[
        list[float],
        Field(
            min_length=300,
            max_length=300,
            description="β: 300 FLAME shape components (the network predicts the first 64 (S, M) or 128 (L); "
            "the rest are 0).",
        ),
    ]
    expression: Annotated[
        list[float],
        Field(
            min_length=100,
            max_length=100,
            description="ψ: 100 FLAME expression components (the first 32 or 64 predicted, the rest 0).",
        ),
    ]
    jaw_pose: Annotated[Point3, Field(description="Jaw rotation, axis-angle in radians.")]
    rotation: Annotated[
        list[Point3],
        Field(min_length=3, max_length=3, description="FLAME frame to image frame rotation (rows)."),
    ]
    translation_px: Annotated[Point3, Field(description="Where the offset FLAME origin lands, image pixels.")]
    scale_px_per_m: Annotated[float, Field(gt=0, description="Image pixels per FLAME meter.")]


class KaoLRMParams(_Strict):
    """One head's FLAME parameters as KaoLRM predicts them from its crop (no fit), in KaoLRM's frame:
    the mesh is p = scale · FLAME(β, ψ, global, jaw) + translation (z of the translation set to 0 for
    the mono checkpoint), seen by a pinhole at p = (0, 0, 2) looking along −z with focal synth_focal:
    crop u = 0.5 + f · p_x / (2 − p_z), v = 0.5 − f · p_y / (2 − p_z), photo pixel = crop_origin_px +
    (u, v) · crop_side_px (docs/models.md)."""

    model: Literal["kaolrm"]
    checkpoint: Annotated[Literal["mono", "multiview"], Field(description="The KaoLRM checkpoint that ran.")]
    synth_focal: Annotated[float, Field(gt=0, description="Its focal, normalised by the crop side.")]
    image_size: Annotated[
        list[Annotated[int, Field(ge=1)]],
        Field(min_length=2, max_length=2, description="Width and height of the photo the head is in."),
    ]
    shape: Annotated[
        list[float],
        Field(min_length=100, max_length=100, description="β: FLAME's first 100 shape components."),
    ]
    expression: Annotated[
        list[float],
        Field(min_length=50, max_length=50, description="ψ: FLAME's first 50 expression components."),
    ]
    global_pose: Annotated[Point3, Field(description="Global rotation, axis-angle in radians.")]
    jaw_pose: Annotated[Point3, Field(description="Jaw rotation, axis-angle in radians.")]
    scale: Annotated[float, Field(ge=0.1, description="KaoLRM's scale (softplus, at least 0.1).")]
    translation: Annotated[Point3, Field(description="KaoLRM's translation as predicted.")]
    crop_origin_px: Annotated[Point2, Field(description="The crop's top-left corner in photo pixels.")]
    crop_side_px: Annotated[float, Field(gt=0, description="The crop's side in photo pixels.")]
    flame_model: Annotated[
        Literal["checkpoint", "imported"] | None,
        Field(
            description="Whose FLAME tensors built the mesh: the checkpoint's (kept by the import) or the "
            "operator's imported FLAME; null when no mesh was built (no imported FLAME with UVs)."
        ),
    ]


HeadParams = NoParams | FlameParams | VGGHeadsParams | KaoLRMParams

# Pipelines whose heads must carry one kind of params (checked by the schema's `allOf`).
PIPELINE_PARAMS: dict[str, type[BaseModel]] = {
    "facemesh": NoParams,
    "flame": FlameParams,
    "vggheads": VGGHeadsParams,
    "kaolrm": KaoLRMParams,
}


class RegistrationRecord(_Strict):
    """The `topology=` template fit of one head (docs/topology.md)."""

    template: str
    target_landmarks: Annotated[
        Literal["flame", "mediapipe"] | None, Field(description="Whose ids placed the template on the head.")
    ]
    landmarks: Annotated[int, Field(ge=0)]
    residual_mm: Annotated[
        float | None,
        Field(
            ge=0, description="Mean distance of the data-driven template vertices to the head's surface, mm."
        ),
    ]
    residual_p95_mm: Annotated[float | None, Field(ge=0)]
    landmark_error_mm: Annotated[float | None, Field(ge=0)]
    driven_share: Annotated[
        float,
        Field(ge=0, le=1, description="Share of the template's vertices that the head's surface pulled."),
    ]
    steps: Annotated[int, Field(ge=0)]
    fit_ms: Annotated[float, Field(ge=0)]
    face_region_only: Annotated[
        bool, Field(description="Only the template's face group followed the data (a face-mesh head).")
    ]


class HeadArtifacts(_Strict):
    """Artifact kind to file name, for the files written for this head."""

    glb: ArtifactName | None = None
    obj: ArtifactName | None = None
    mtl: ArtifactName | None = None
    texture: ArtifactName | None = None
    splats: ArtifactName | None = None
    binding: ArtifactName | None = None


class HeadRecord(_Strict):
    index: Annotated[int, Field(ge=0, description="Head number in its view: artifacts are named h<index>.*")]
    view: Annotated[
        int, Field(ge=0, description="The photo of the capture the head was found in (0 for one photo).")
    ] = 0
    box: Annotated[
        list[float], Field(min_length=4, max_length=4, description="x0, y0, x1, y1 in original-image pixels.")
    ]
    score: Annotated[float, Field(ge=0, le=1, description="Detector confidence.")]
    keypoints: Annotated[
        list[Point2],
        Field(
            description="Detector keypoints: right eye, left eye, nose tip, mouth center, right ear tragion, "
            "left ear tragion (subject's sides)."
        ),
    ]
    landmark_score: Annotated[
        float | None, Field(ge=0, le=1, description="Face-presence score of the landmark network.")
    ]
    pose: Pose | None
    landmarks_2d: list[Point2]
    landmarks_3d: list[Point3]
    params: Annotated[
        HeadParams,
        Field(
            description="Pipeline model parameters: empty for facemesh, the fitted FLAME parameters for flame."
        ),
    ]
    mesh: MeshRecord | None
    texture_size: Annotated[int | None, Field(ge=1)]
    texture_coverage: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            description="Share of the UV-island texels of this head's own photo's texture colored from the photo "
            "(directly or through the mirror); the rest is inpainted. Null when a stage made the texture.",
        ),
    ]
    texture_seen: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            description="Share of the UV-island texels seen directly in this head's photo: not filled by mirroring "
            "or inpainting. Null when a stage made the texture.",
        ),
    ] = None
    splats: Annotated[int, Field(ge=0)]
    splat_source: Annotated[
        Literal["sampled", "learned"] | None,
        Field(description="sampled on the mesh by the default step, or learned by a network."),
    ] = None
    sh_degree: Annotated[
        int | None, Field(ge=0, le=3, description="Spherical-harmonic degree of the splats.")
    ] = None
    artifacts: HeadArtifacts
    registration: RegistrationRecord | None = None


class Artifact(_Strict):
    name: ArtifactName
    kind: Literal["glb", "obj", "mtl", "texture", "splats", "binding", "preview"]
    head: Annotated[int | None, Field(ge=0, description="The head it belongs to; null for a preview.")]
    bytes: Annotated[int, Field(ge=1)]
    sha256: Sha256
    view: Annotated[
        int | None, Field(ge=0, description="The view of a capture of several views the file belongs to.")
    ] = None


class ModelFile(_Strict):
    file: Annotated[str, Field(min_length=1)]
    sha256: Sha256


class ModelRecord(_Strict):
    name: str
    version: str
    sha256: Sha256 | None
    format: str
    sources: Annotated[
        dict[str, ModelFile] | None,
        Field(
            description="For an imported asset (FLAME): the operator's files it was imported from, by role (model, "
            "landmarks_mediapipe, landmarks_ibug68, uv)."
        ),
    ] = None


class SubjectPose(_Strict):
    yaw: Annotated[float, Field(ge=-180, le=180, description="Degrees, AFLW2000 convention.")]
    pitch: Annotated[float, Field(ge=-180, le=180, description="Degrees, AFLW2000 convention.")]
    roll: Annotated[float, Field(ge=-180, le=180, description="Degrees, AFLW2000 convention.")]


class SubjectView(_Strict):
    """One photo's part in a subject: whether its face was used, its pose and its fit residual."""

    view: Annotated[int, Field(ge=0)]
    filename: str
    faces_found: Annotated[
        int,
        Field(ge=0, description="Faces the head source found in the photo; the largest is the subject's."),
    ]
    status: Annotated[
        Literal["used", "no_face", "dropped"],
        Field(
            description="used: the photo's head is part of the subject; no_face: none was found; dropped: a "
            "stage refused the head (the notes say why)."
        ),
    ]
    head: Annotated[
        int | None, Field(ge=0, description="Index of the photo's head in `heads` (with `view`).")
    ]
    pose: SubjectPose | None
    fit_residual_px: Annotated[
        float | None,
        Field(
            ge=0,
            description="The view's mean 2D landmark distance in the fused fit, pixels (FLAME pipelines).",
        ),
    ]


class SubjectIdentityRecord(_Strict):
    """The identity fitted once for the whole subject: every used view's head carries this β."""

    model: Literal["flame"]
    shape: Annotated[
        list[float],
        Field(min_length=100, max_length=100, description="β: FLAME's first 100 shape components, shared."),
    ]
    views: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, description="The views fitted.")]
    fit_residual_px: Annotated[
        float | None, Field(ge=0, description="Mean 2D landmark distance over every fitted view, pixels.")
    ]
    fit_iterations: Annotated[int | None, Field(ge=0, description="Levenberg-Marquardt iterations run.")]


class SubjectRecord(_Strict):
    """A subject job (subject=true): one person seen in 1..8 photos (docs/subjects.md)."""

    views: Annotated[list[SubjectView], Field(description="Every photo of the job, in upload order.")]
    used_views: Annotated[
        list[Annotated[int, Field(ge=0)]], Field(description="The views whose head was used.")
    ]
    identity: Annotated[
        SubjectIdentityRecord | None,
        Field(
            description="The fused identity; null for a pipeline that fits none (facemesh) or no usable view."
        ),
    ]


class SubjectTextureView(_Strict):
    view: Annotated[int, Field(ge=0)]
    head: Annotated[int, Field(ge=0, description="The fused head of that view (its largest).")]
    texture_seen: Annotated[float, Field(ge=0, le=1, description="What that photo alone sees directly.")]


class SubjectTextureRecord(_Strict):
    """The texture fused across the photos of a subject capture; every fused head's files carry it."""

    texture_seen: Annotated[
        float,
        Field(ge=0, le=1, description="Share of the UV-island texels seen directly in some photo."),
    ]
    texture_coverage: Annotated[
        float,
        Field(ge=0, le=1, description="Share seen directly or through the mirror in some photo."),
    ]
    frontal_view: Annotated[int, Field(ge=0, description="The view whose head is turned least (|yaw|).")]
    views: Annotated[list[SubjectTextureView], Field(min_length=2)]


class ResultDocument(_Strict):
    """What `headforge reconstruct` and the worker write for one capture: every head found, the
    artifacts written, timings and model versions. Coordinates are original-image pixels after EXIF
    orientation (x right, y down); 3D landmark z is on the x scale, larger z farther from the camera."""

    schema_version: Literal[1]
    headforge_version: Annotated[str, Field(min_length=1)]
    pipeline: Annotated[
        str, Field(min_length=1, description="The pipeline that produced the heads, e.g. facemesh or flame.")
    ]
    options: ReconstructOptions
    source: Annotated[Source, Field(description="The photo (the first, in a capture of several views).")]
    image: Annotated[
        Image, Field(description="The decoded photo (the first, in a capture of several views).")
    ]
    heads: list[HeadRecord]
    artifacts: list[Artifact]
    notes: Annotated[list[str], Field(description="Human-readable remarks, e.g. that no face was found.")]
    timings_ms: Annotated[
        dict[str, Annotated[float, Field(ge=0)]],
        Field(description="Wall time per stage in milliseconds (stages summed over heads), plus total."),
    ]
    models: Annotated[
        list[ModelRecord], Field(description="The networks and assets the run used, networks first.")
    ]
    views: Annotated[
        list[ViewRecord] | None,
        Field(description="Every photo of a capture of several views (subject=true); absent for one photo."),
    ] = None
    subject: Annotated[
        SubjectRecord | None,
        Field(
            description="The subject of a subject=true job: the photos used and the identity fused from them."
        ),
    ] = None
    subject_texture: Annotated[
        SubjectTextureRecord | None,
        Field(
            description="The subject's texture fused across its photos; absent unless two or more photos show it."
        ),
    ] = None


class _Generator(GenerateJsonSchema):
    """Pydantic's schema without per-field titles (the names say it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def generate_result_schema() -> dict[str, Any]:
    """The JSON Schema of `result.json`, from `ResultDocument`."""
    schema: JsonSchemaValue = ResultDocument.model_json_schema(
        ref_template="#/$defs/{model}", schema_generator=_Generator
    )
    schema["properties"]["timings_ms"]["required"] = ["decode", "total"]
    schema["allOf"] = [
        {
            "if": {"properties": {"pipeline": {"const": name}}, "required": ["pipeline"]},
            "then": {
                "properties": {
                    "heads": {"items": {"properties": {"params": {"$ref": f"#/$defs/{model.__name__}"}}}}
                }
            },
        }
        for name, model in PIPELINE_PARAMS.items()
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "headforge result.json",
    }


def schema_text() -> str:
    """The generated schema as the checked-in file holds it."""
    return json.dumps(generate_result_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    sys.stdout.write(f"wrote {SCHEMA_PATH}\n")
