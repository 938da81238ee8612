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
    code = "not_an_image"
    http_status = 415


class EmptyFileError(InputError):
    code = "empty_file"


class TruncatedImageError(InputError):
    code = "truncated_image"


class TooManyPixelsError(InputError):
    code = "too_many_pixels"
    http_status = 413


class FileTooLargeError(InputError):
    code = "file_too_large"
    http_status = 413


class TooManyFilesError(InputError):
    code = "too_many_files"
    http_status = 413


class InvalidOptionError(InputError):
    code = "invalid_option"
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


class AssetError(HeadforgeError):
    """An operator-supplied asset (FLAME pickle, template) is malformed or unsafe."""

    code = "invalid_asset"
    http_status = 422
