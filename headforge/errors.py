"""Errors with stable codes, shared by the pipeline, the CLI and the HTTP API.

Every failure a user can cause or meet has a code here. The API maps `http_status` to its
response; the CLI prints `code: message` and exits non-zero.
"""

from __future__ import annotations

from typing import Any


class HeadforgeError(Exception):
    """Base error: a stable machine-readable code, a human message and optional details."""

    code = "internal_error"
    http_status = 500
    transient = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InputError(HeadforgeError):
    """The caller sent something we cannot use (HTTP 4xx)."""

    code = "bad_request"
    http_status = 400


class NotAnImageError(InputError):
    """Not a format headforge reads: an unknown signature, or a known but unsupported format."""

    code = "not_an_image"
    http_status = 415


class EmptyFileError(InputError):
    code = "empty_file"


class TruncatedImageError(InputError):
    """A recognized image format whose data ends early."""

    code = "truncated_image"


class CorruptImageError(InputError):
    """A recognized image format (by its signature) whose header or data is broken: a failed
    checksum, an unparsable header, or pixel data the decoder refuses."""

    code = "corrupt_image"


class TooManyPixelsError(InputError):
    code = "too_many_pixels"
    http_status = 413


class FileTooLargeError(InputError):
    code = "file_too_large"
    http_status = 413


class UnreadableFileError(InputError):
    """A local input path that does not exist or cannot be read (CLI)."""

    code = "unreadable_file"


class TooManyFilesError(InputError):
    code = "too_many_files"
    http_status = 413


class TooManySubjectPhotosError(TooManyFilesError):
    """A subject job (`subject=true`) with more photos than one identity fit takes (8)."""

    code = "too_many_subject_photos"


class InvalidImageError(InputError):
    """An in-memory image that is not an (H, W, 3) uint8 RGB array, or too small to use."""

    code = "invalid_image"
    http_status = 422


class InvalidOptionError(InputError):
    code = "invalid_option"
    http_status = 422


class InvalidSequenceError(InvalidOptionError):
    """An animation sequence that is not what `headforge animate` reads: an expression array whose
    length is not the head's K, a jaw that is not 3 numbers, non-finite or out-of-range values."""

    code = "invalid_sequence"


class TooManyFramesError(InputError):
    code = "too_many_frames"
    http_status = 413


class NotAnimatableError(InputError):
    """Animation asked of a result without FLAME heads (morph targets and bound splats)."""

    code = "not_animatable"
    http_status = 422


class UnknownPipelineError(InputError):
    code = "unknown_pipeline"
    http_status = 422


class PipelineUnavailableError(HeadforgeError):
    """The pipeline exists but this deployment lacks what it needs (e.g. FLAME files)."""

    code = "pipeline_unavailable"
    http_status = 422


class ModelsMissingError(HeadforgeError):
    """The model repository is empty or incomplete; `headforge models pull` fixes it."""

    code = "models_missing"
    http_status = 503


class ModelFetchError(HeadforgeError):
    """Fetching or verifying published weights failed (offline, checksum mismatch)."""

    code = "model_fetch_failed"
    http_status = 503
    transient = True


class ModelExportError(HeadforgeError):
    """Exporting a module (ONNX, TensorRT) failed, or its outputs drifted past the parity bound."""

    code = "model_export_failed"
    http_status = 500


class AssetError(HeadforgeError):
    """An operator-supplied asset (FLAME pickle, template) is malformed or unsafe."""

    code = "invalid_asset"
    http_status = 422


# --- Service errors (HTTP API) ---


class UnauthorizedError(HeadforgeError):
    """Missing or unknown API key."""

    code = "unauthorized"
    http_status = 401


class NotFoundError(HeadforgeError):
    """No such job, batch, artifact or route visible to this caller."""

    code = "not_found"
    http_status = 404


class MethodNotAllowedError(HeadforgeError):
    code = "method_not_allowed"
    http_status = 405


class RateLimitedError(HeadforgeError):
    """Too many requests for this API key; `details.retry_after` says when to retry."""

    code = "rate_limited"
    http_status = 429


class TooManyQueuedError(HeadforgeError):
    """This API key already has the maximum number of unfinished jobs."""

    code = "too_many_queued"
    http_status = 429


class IdempotencyConflictError(HeadforgeError):
    """An `Idempotency-Key` was reused with a different request body."""

    code = "idempotency_conflict"
    http_status = 409


class JobNotFinishedError(HeadforgeError):
    """The job has no artifacts yet (still queued or running)."""

    code = "job_not_finished"
    http_status = 409


class WebhookRefusedError(InputError):
    """The webhook URL is malformed or points at a loopback/private address."""

    code = "webhook_url_refused"
    http_status = 422


class WebhookHostUnresolvedError(WebhookRefusedError):
    """The webhook URL's host does not resolve: refused at submission, retried at delivery (DNS can recover)."""


class ServiceUnavailableError(HeadforgeError):
    """The broker or the job store cannot be reached right now."""

    code = "service_unavailable"
    http_status = 503
    transient = True


class JobTimeoutError(HeadforgeError):
    """The job ran past the worker's time limit."""

    code = "job_timeout"
    http_status = 500


class WorkerLostError(HeadforgeError):
    """The job was retried after worker crashes more times than allowed."""

    code = "worker_lost"
    http_status = 500


class InvalidLandmarksError(InputError):
    """Landmarks handed to a geometry stage have the wrong shape or non-finite values."""

    code = "invalid_landmarks"
    http_status = 422


class InvalidCheckpointError(InputError):
    """A model checkpoint that cannot be imported: not a checkpoint, truncated, another family's
    weights, or tensors whose names or shapes differ from the model's (the message names the
    first such key)."""

    code = "invalid_checkpoint"
    http_status = 422


class RequestTimeoutError(HeadforgeError):
    """The client sent the request body too slowly (the server's read timeouts, docs/service.md)."""

    code = "request_timeout"
    http_status = 408


class IdempotencyInProgressError(HeadforgeError):
    """An earlier request with the same Idempotency-Key is still being stored; retry shortly."""

    code = "idempotency_in_progress"
    http_status = 409


# --- Studio templates and retopology (docs/topology.md) ---


class TemplateError(AssetError):
    """An operator's head template that cannot be used; `code` says why (stable codes below)."""

    code = "invalid_template"
    http_status = 422


class TemplateEmptyError(TemplateError):
    code = "template_empty"


class TemplateNonManifoldError(TemplateError):
    code = "template_non_manifold"


class TemplateNoUVsError(TemplateError):
    code = "template_no_uvs"


class TemplateLandmarkRangeError(TemplateError):
    """A landmark or vertex-group id outside the template's vertices, or outside FLAME / MediaPipe's ids."""

    code = "template_landmark_out_of_range"


class TemplateNotFoundError(InputError):
    code = "unknown_template"
    http_status = 422


class TemplateLandmarksMissingError(InputError):
    """A pipeline's `topology=` names a template without landmarks for that pipeline's head."""

    code = "template_landmarks_missing"
    http_status = 422


class InvalidMeshError(InputError):
    """A target mesh upload that is not a readable OBJ, GLB or PLY triangle mesh."""

    code = "invalid_mesh"
    http_status = 422


class MeshTooLargeError(InputError):
    code = "mesh_too_large"
    http_status = 413


class TargetNotOverlappingError(InputError):
    """After the landmark alignment, the target mesh and the template do not overlap."""

    code = "target_not_overlapping"
    http_status = 422
