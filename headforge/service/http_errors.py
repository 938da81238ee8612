"""How errors leave the gateway: every one as `{"error": {"code", "message", "details"}}` with a code
from `headforge.errors` (FastAPI's validation errors and Starlette's 404/405 included), with
`Retry-After` on 409/429/503 and `WWW-Authenticate` on 401."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from headforge.errors import HeadforgeError, InvalidOptionError, MethodNotAllowedError, NotFoundError
from headforge.service.contracts import ErrorEnvelope

log = logging.getLogger("headforge.api")


def error_body(error: HeadforgeError) -> dict[str, Any]:
    return {"error": error.to_dict()}


def error_response(error: HeadforgeError) -> JSONResponse:
    headers = {}
    retry_after = error.details.get("retry_after") if error.details else None
    if error.http_status in (409, 429, 503) and retry_after is not None:
        headers["Retry-After"] = str(math.ceil(float(retry_after)))
    elif error.http_status == 503:
        headers["Retry-After"] = "5"
    if error.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for `statuses`, each with the `ErrorEnvelope` schema and an example code."""
    return {status: ERROR_RESPONSES[status] for status in statuses}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {
        "model": ErrorEnvelope,
        "description": text,
        "content": {
            "application/json": {"example": {"error": {"code": name, "message": "…", "details": {}}}}
        },
    }
    for code, name, text in (
        (400, "bad_request", "Bad input (empty file, truncated or corrupt image, …)"),
        (401, "unauthorized", "Missing or unknown API key"),
        (404, "not_found", "No such resource for this key"),
        (409, "idempotency_conflict", "Conflict"),
        (413, "file_too_large", "Too large (bytes, pixels or file count)"),
        (415, "not_an_image", "Not an image headforge can read"),
        (422, "invalid_option", "Bad option, unknown or unavailable pipeline"),
        (429, "rate_limited", "Rate limit or queued-jobs cap; see Retry-After"),
        (503, "service_unavailable", "Broker or store unreachable"),
    )
}


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a request can raise to the error envelope."""

    @app.exception_handler(HeadforgeError)
    async def _headforge_error(_request: Request, error: HeadforgeError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in item.get("loc", ())), "message": str(item.get("msg", ""))}
            for item in error.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        return error_response(InvalidOptionError(f"invalid request: {summary}", details={"errors": problems}))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(NotFoundError("no such resource"))
        if error.status_code == 405:
            return error_response(MethodNotAllowedError("method not allowed on this resource"))
        generic = HeadforgeError(str(error.detail), code="bad_request" if error.status_code < 500 else None)
        generic.http_status = error.status_code
        return error_response(generic)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(HeadforgeError(f"internal error: {type(error).__name__}"))
