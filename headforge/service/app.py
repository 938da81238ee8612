"""The FastAPI gateway: validates uploads, stores them, records jobs and publishes their ids.

It never runs the pipeline. Every error leaves as `{"error": {"code", "message", "details"}}` with
a code from `headforge.errors` (validation errors from FastAPI included).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import re
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from headforge.errors import (
    EmptyFileError,
    FileTooLargeError,
    HeadforgeError,
    IdempotencyInProgressError,
    InvalidOptionError,
    JobNotFinishedError,
    MethodNotAllowedError,
    NotAnImageError,
    NotFoundError,
    PipelineUnavailableError,
    ServiceUnavailableError,
    TooManyFilesError,
)
from headforge.pipeline.subject import check_subject_photo_count
from headforge.service import webhooks
from headforge.service.animate import router as animate_router
from headforge.service.auth import Authenticator, Principal
from headforge.service.celery_app import dispatch, make_celery, publish_webhook
from headforge.service.forms import option_fields
from headforge.service.guard import BodyGuard
from headforge.service.jobs import (
    CANCELED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobStore,
    make_backend,
    new_id,
)
from headforge.service.metrics import make_registry
from headforge.service.ratelimit import check_rate
from headforge.service.retopology import router as retopology_router
from headforge.service.settings import Settings
from headforge.service.store import ArtifactStore, make_store, store_os_error
from headforge.service.views import public_batch, public_job

log = logging.getLogger("headforge.api")

STATIC_DIR = Path(__file__).parent / "static"
MAX_WAIT_SECONDS = 60
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# A zip entry over 1 MiB that expands more than this many times its stored size is refused before
# it is extracted: photos are compressed already, so only a bomb (or a huge flat bitmap) gets there.
MAX_ZIP_RATIO = 100
ZIP_RATIO_MIN_BYTES = 1024 * 1024
# An archive may hold this many times `max_files_per_batch` entries of any kind (folders, skipped
# files); the count its end record declares is checked before its central directory is parsed.
ZIP_MAX_ENTRIES_FACTOR = 10
ZIP_EOCD_SEARCH = 65535  # the longest archive comment: the end record lies within this of the end
ZIP_READ_BLOCK = 1024 * 1024
# How long a request whose Idempotency-Key another request has reserved waits for that request's
# batch record before it is told to retry (409 `idempotency_in_progress`).
IDEMPOTENCY_WAIT_SECONDS = 10.0


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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {
        "error": {"code": name, "message": "…", "details": {}}}}}}
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


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class ServiceState:
    settings: Settings
    jobs: JobStore
    store: ArtifactStore
    auth: Authenticator
    celery: Any


def _safe_filename(name: str | None, index: int) -> str:
    base = PurePosixPath((name or "").replace("\\", "/")).name
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return cleaned or f"image{index}"


def validate_options(values: dict[str, Any]) -> dict[str, Any]:
    """Check options exactly as the worker will read them; return their normalized form."""
    from headforge.pipeline.run import ReconstructOptions, pipeline_missing_reason

    options = ReconstructOptions.from_dict(values)
    reason = pipeline_missing_reason(options.pipeline)
    if reason is not None:
        raise PipelineUnavailableError(
            f"pipeline {options.pipeline!r} is not available on this server: {reason}",
            details={"pipeline": options.pipeline, "reason": reason},
        )
    if options.topology is not None:  # unknown_template / template_landmarks_missing at submission
        from headforge.pipeline.retopology import topology_stage

        topology_stage(options.topology, options.pipeline)
    return options.to_dict()


def validate_image(upload: Upload, settings: Settings, gate: threading.Semaphore | None = None) -> dict[str, Any]:
    """Size limits, then the gateway's check decode (`verify_image`: every byte decoded, in the file's
    own pixel mode, JPEGs at 1/8 scale), so truncated or corrupt files never reach a worker. `gate`
    bounds how many uploads are decoded at once."""
    from headforge.pipeline.decode import verify_image

    if not upload.data:
        raise EmptyFileError(f"{upload.filename} is empty", details={"filename": upload.filename})
    if len(upload.data) > settings.max_upload_bytes:
        raise FileTooLargeError(
            f"{upload.filename} is {len(upload.data)} bytes, over the {settings.max_upload_bytes} byte limit",
            details={"filename": upload.filename, "bytes": len(upload.data), "max_bytes": settings.max_upload_bytes},
        )
    try:
        if gate is None:
            probe = verify_image(upload.data)
        else:
            with gate:
                probe = verify_image(upload.data)
    except HeadforgeError as error:
        error.details = {**error.details, "filename": upload.filename}
        raise
    return {"format": probe.format, "width": probe.width, "height": probe.height}


def _read_uploads(files: list[UploadFile], settings: Settings) -> list[Upload]:
    uploads = []
    for index, item in enumerate(files):
        data = item.file.read(settings.max_upload_bytes + 1)
        name = _safe_filename(item.filename, index)
        if len(data) > settings.max_upload_bytes:
            raise FileTooLargeError(
                f"{name} is over the {settings.max_upload_bytes} byte limit",
                details={"filename": name, "max_bytes": settings.max_upload_bytes},
            )
        uploads.append(Upload(name, data))
    return uploads


def _zip_entry_count(handle: IO[bytes]) -> int | None:
    """The entry count an archive's end-of-central-directory record declares (ZIP64 included), read
    from its last 64 KiB before `zipfile` parses (and holds) the whole central directory; None when
    no such record is found (then `zipfile` refuses the file)."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    tail_start = max(0, size - (ZIP_EOCD_SEARCH + 22))
    handle.seek(tail_start)
    tail = handle.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        return None
    count = int.from_bytes(tail[end + 10 : end + 12], "little")
    locator = end - 20
    if count == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        record = int.from_bytes(tail[locator + 8 : locator + 16], "little")
        if record + 40 <= size:
            handle.seek(record)
            zip64 = handle.read(40)
            if zip64[:4] == b"PK\x06\x06":
                count = int.from_bytes(zip64[32:40], "little")
    return count


def _unzip(source: bytes | IO[bytes], settings: Settings) -> list[Upload]:
    """Image entries of a zip, with limits on count and expanded size (zip bombs).

    Before anything is extracted: the entry count the archive declares (before `zipfile` reads its
    central directory), then each image entry's declared size against the per-file limit and
    `MAX_ZIP_RATIO`, and their sum against the request limit (what the images could have weighed
    sent one by one). Each entry is then read in blocks under a running cap, so an entry whose data
    expands past what its header says stops there, and one whose first block is no image format
    is refused before the rest of it is inflated."""
    from headforge.pipeline.decode import sniff_format

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    max_entries = ZIP_MAX_ENTRIES_FACTOR * settings.max_files_per_batch
    try:
        declared_count = _zip_entry_count(handle)
        handle.seek(0)
    except (OSError, ValueError) as error:
        raise NotAnImageError("the archive is not a readable zip file") from error
    if declared_count is not None and declared_count > max_entries:
        raise TooManyFilesError(
            f"the archive holds {declared_count} entries, over the limit of {max_entries}",
            details={"entries": declared_count, "max_entries": max_entries},
        )
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise NotAnImageError("the archive is not a readable zip file") from None
    if len(archive.infolist()) > max_entries:
        raise TooManyFilesError(f"the archive holds over {max_entries} entries",
                                details={"entries": len(archive.infolist()), "max_entries": max_entries})
    entries = [
        info for info in archive.infolist()
        if not info.is_dir() and not PurePosixPath(info.filename).name.startswith(".")
        and "__MACOSX" not in info.filename and PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
    ]
    if not entries:
        raise InvalidOptionError("the archive holds no image files (jpg, png, webp, bmp, tiff)")
    if len(entries) > settings.max_files_per_batch:
        raise TooManyFilesError(
            f"the archive holds {len(entries)} images, over the limit of {settings.max_files_per_batch}",
            details={"files": len(entries), "max_files": settings.max_files_per_batch},
        )
    declared = 0
    for index, info in enumerate(entries):
        name = _safe_filename(info.filename, index)
        if info.file_size > settings.max_upload_bytes:
            raise FileTooLargeError(f"{name} expands to {info.file_size} bytes, over the limit",
                                    details={"filename": name, "bytes": info.file_size,
                                             "max_bytes": settings.max_upload_bytes})
        if info.file_size > ZIP_RATIO_MIN_BYTES and info.file_size > MAX_ZIP_RATIO * max(1, info.compress_size):
            raise FileTooLargeError(
                f"{name} expands {info.file_size / max(1, info.compress_size):.0f} times its stored size "
                f"(the limit is {MAX_ZIP_RATIO}); refused as a zip bomb",
                details={"filename": name, "bytes": info.file_size, "stored_bytes": info.compress_size,
                         "max_ratio": MAX_ZIP_RATIO},
            )
        declared += info.file_size
    if declared > settings.max_request_bytes:
        raise FileTooLargeError(
            f"the archive expands to {declared} bytes, over the {settings.max_request_bytes} byte request limit",
            details={"bytes": declared, "max_bytes": settings.max_request_bytes},
        )
    uploads = []
    total = 0
    for index, info in enumerate(entries):
        name = _safe_filename(info.filename, index)
        cap = min(info.file_size, settings.max_upload_bytes)
        parts: list[bytes] = []
        size = 0
        try:
            with archive.open(info) as entry:
                while block := entry.read(min(ZIP_READ_BLOCK, cap + 1 - size)):
                    if not parts and sniff_format(block) is None:
                        raise NotAnImageError(f"{name} in the archive is not a JPEG, PNG, WebP, BMP or TIFF file",
                                              details={"filename": name})
                    size += len(block)
                    total += len(block)
                    if size > cap or total > settings.max_request_bytes:
                        raise FileTooLargeError(f"{name} expands past its declared size or the limits",
                                                details={"filename": name, "max_bytes": cap})
                    parts.append(block)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
                zlib.error) as error:
            raise NotAnImageError(f"{name} cannot be read from the archive: {type(error).__name__}",
                                  details={"filename": name}) from None
        uploads.append(Upload(name, b"".join(parts)))
    return uploads


def _fingerprint(kind: str, uploads: list[Upload], options: dict[str, Any], webhook_url: str | None) -> str:
    digest = hashlib.sha256(kind.encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update((webhook_url or "").encode())
    for upload in uploads:
        digest.update(hashlib.sha256(upload.data).digest())
    return digest.hexdigest()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway for `settings` (default: from the environment)."""
    from headforge.observability import configure_logging

    settings = settings or Settings.from_env()
    configure_logging(json_logs=settings.json_logs)
    jobs = JobStore(make_backend(settings, retry_seconds=3.0), settings)
    state = ServiceState(settings, jobs, make_store(settings), Authenticator(settings), make_celery(settings))
    registry, request_counter, request_latency = make_registry(jobs)
    if not state.auth.enabled:
        message = ("headforge: WARNING: no API keys configured (HEADFORGE_API_KEYS_FILE / HEADFORGE_API_KEYS): "
                   "authentication is OFF; anyone who can reach this port can submit and read jobs")
        print(message, file=sys.stderr, flush=True)
        log.warning("authentication is off: no API keys configured")

    app = FastAPI(
        title="headforge",
        version="0.1.0",
        description="Photos of people in, 3D head assets out. Errors: `{\"error\": {code, message, details}}`.",
        responses=ERROR_RESPONSES,
    )
    app.state.headforge = state
    app.include_router(retopology_router)  # POST /v1/retopology (service/retopology.py)
    app.include_router(animate_router)  # POST /v1/jobs/{id}/animate (service/animate.py)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    # ------------------------------------------------------------------ errors and middleware

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

    @app.middleware("http")
    async def _guard_and_measure(request: Request, call_next: Callable[[Request], Any]) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "other")
        request_counter.labels(request.method, label, str(response.status_code)).inc()
        request_latency.labels(label).observe(time.perf_counter() - started)
        return response

    # Outermost: the key and the size limit are checked before any body byte is read (guard.py).
    app.add_middleware(
        BodyGuard, max_bytes=settings.max_request_bytes, body_timeout=settings.body_timeout,
        body_idle_timeout=settings.body_idle_timeout, authenticate=state.auth.authenticate, respond=error_response,
    )
    decode_gate = threading.BoundedSemaphore(settings.max_concurrent_decodes)

    def principal_of(authorization: str | None) -> Principal:
        return state.auth.authenticate(authorization)

    def base_url() -> str:
        return ""

    # ------------------------------------------------------------------ submission

    def _reserve(principal: Principal, key: str | None, fingerprint: str, new_resource: str) -> str | None:
        if not key:
            return None
        if len(key) > 255:
            raise InvalidOptionError("Idempotency-Key must be at most 255 characters")
        return jobs.reserve_idempotency(principal.owner, key, fingerprint, new_resource)

    def _submit(
        principal: Principal, uploads: list[Upload], options_in: dict[str, Any], webhook_url: str | None,
        idempotency_key: str | None, *, batch: bool,
    ) -> tuple[str, bool]:
        """Validate, store and enqueue; return (job or batch id, whether it already existed)."""
        options = validate_options(options_in)
        if webhook_url:
            webhooks.check_webhook_url(webhook_url, settings.webhook_allow_private)
        inputs_meta = [validate_image(upload, settings, decode_gate) for upload in uploads]
        kind = "batch" if batch else "job"
        resource_id = new_id(kind)
        fingerprint = _fingerprint(kind, uploads, options, webhook_url)
        existing = _reserve(principal, idempotency_key, fingerprint, resource_id)
        if existing is not None:
            return existing, True
        queue = settings.queue_for(options["pipeline"])
        groups = [[i] for i in range(len(uploads))] if batch else [list(range(len(uploads)))]
        job_ids = [resource_id] if not batch else [new_id("job") for _ in groups]
        writing = False
        try:
            jobs.check_quota(principal.owner, len(uploads) if batch else 1, principal.max_queued)
            writing = True
            # Every upload is stored before any job exists: a store failure part way through a
            # batch leaves no job behind to run without its batch (the client gets a 503 and retries).
            job_inputs: list[list[dict[str, Any]]] = []
            for job_id, group in zip(job_ids, groups, strict=True):
                inputs = []
                for i in group:
                    key = f"inputs/{job_id}/{i}-{uploads[i].filename}"
                    try:
                        state.store.put_bytes(key, uploads[i].data)
                    except OSError as error:  # a read-only or broken disk: 503, like a full one
                        raise store_os_error(error, "write", key) from error
                    inputs.append({
                        "key": key, "filename": uploads[i].filename, "size": len(uploads[i].data),
                        "sha256": hashlib.sha256(uploads[i].data).hexdigest(), **inputs_meta[i],
                    })
                job_inputs.append(inputs)
            for job_id, group, inputs in zip(job_ids, groups, job_inputs, strict=True):
                jobs.create_job(
                    job_id=job_id, owner=principal.owner, options=options, inputs=inputs, queue=queue,
                    webhook_url=webhook_url, batch_id=resource_id if batch else None,
                    label=uploads[group[0]].filename,
                )
            if batch:
                jobs.create_batch(batch_id=resource_id, owner=principal.owner, job_ids=job_ids,
                                  names=[u.filename for u in uploads])
        except BaseException:
            if writing:
                _discard_submission(job_ids)
            if idempotency_key:
                jobs.release_idempotency(principal.owner, idempotency_key)
            raise
        for job_id in job_ids:
            try:
                dispatch(state.celery, jobs, job_id, queue)
            except Exception as error:  # the job is recorded; the sweeper publishes it later
                log.warning("publish failed, the sweeper will retry: %s", error, extra={"job_id": job_id})
        return resource_id, False

    def _discard_submission(job_ids: list[str]) -> None:
        """Best effort: remove what a failed submission stored or recorded, so none of it runs."""
        for job_id in job_ids:
            try:
                jobs.delete(job_id)
                state.store.delete_prefix(f"inputs/{job_id}/")
            except Exception as error:  # the store or state is what failed (docs/service.md, Store errors)
                log.warning("could not discard a failed submission: %s", error, extra={"job_id": job_id})

    async def _recorded_batch(principal: Principal, batch_id: str, existed: bool) -> dict[str, Any]:
        """The batch record. A repeat whose Idempotency-Key an earlier request holds may arrive
        before that request has recorded its batch: wait for it a while, then ask for a retry."""
        deadline = time.monotonic() + (IDEMPOTENCY_WAIT_SECONDS if existed else 0.0)
        while True:
            try:
                return await run_in_threadpool(jobs.get_batch_for, principal.owner, batch_id)
            except NotFoundError:
                if not existed or time.monotonic() >= deadline:
                    if not existed:
                        raise
                    raise IdempotencyInProgressError(
                        "an earlier request with this Idempotency-Key is still being stored; retry shortly",
                        details={"id": batch_id, "retry_after": 1},
                    ) from None
            await asyncio.sleep(0.05)

    async def _wait_finished(job_id: str, seconds: float) -> dict[str, Any] | None:
        """The job once finished, or None after `seconds`. With Redis, a pub/sub message from the
        worker wakes the request at once; a slow poll covers a lost message (and SQLite)."""
        deadline = time.monotonic() + seconds
        subscription = None
        if settings.redis_url:
            subscription = aioredis_client().pubsub()
            await subscription.subscribe(f"hf:notify:done:{job_id}")
        try:
            poll = 0.02 if subscription is None else 0.5
            while True:
                doc = await run_in_threadpool(jobs.get, job_id)
                if doc is not None and doc["status"] in TERMINAL:
                    return doc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if subscription is None:
                    await asyncio.sleep(min(poll, remaining))
                else:
                    await subscription.get_message(ignore_subscribe_messages=True, timeout=min(poll, remaining))
        finally:
            if subscription is not None:
                await subscription.aclose()

    aio_clients: list[Any] = []

    def aioredis_client() -> Any:
        if not aio_clients:
            import redis.asyncio

            aio_clients.append(redis.asyncio.Redis.from_url(settings.redis_url or "", socket_connect_timeout=2))
        return aio_clients[0]

    def _finished_body(doc: dict[str, Any]) -> dict[str, Any]:
        return public_job(doc, jobs, state.store, include_result=True, base_url=base_url())

    def _accepted(job_id: str) -> JSONResponse:
        doc = jobs.get(job_id)
        status = doc["status"] if doc else QUEUED
        return JSONResponse(
            {"id": job_id, "status": status, "status_url": f"{base_url()}/v1/jobs/{job_id}"},
            status_code=202, headers={"Location": f"/v1/jobs/{job_id}"},
        )

    @app.post("/v1/jobs", status_code=202, summary="Submit one or more images as one job")
    async def submit_job(
        images: Annotated[list[UploadFile], File(description="Image files (repeat the field)")],
        options: Annotated[dict[str, Any], Depends(option_fields)],
        webhook_url: Annotated[str | None, Form()] = None,
        wait: Annotated[int, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for the result")] = 0,
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        principal = principal_of(authorization)
        await run_in_threadpool(check_rate, jobs.backend, principal)
        if options.get("subject") is True:  # 413 too_many_subject_photos over 8
            check_subject_photo_count(len(images))
        if len(images) > settings.max_files_per_job:
            raise TooManyFilesError(
                f"{len(images)} files in one job; the limit is {settings.max_files_per_job} (use /v1/batches)",
                details={"files": len(images), "max_files": settings.max_files_per_job},
            )
        uploads = await run_in_threadpool(_read_uploads, images, settings)
        values = options
        job_id, _existed = await run_in_threadpool(
            _submit, principal, uploads, values, webhook_url or None, idempotency_key, batch=False)
        if wait:
            doc = await _wait_finished(job_id, float(wait))
            if doc is not None:
                body = await run_in_threadpool(_finished_body, doc)
                return JSONResponse(body, status_code=200)
        return _accepted(job_id)

    @app.post("/v1/batches", status_code=202, summary="Submit many images (or one zip) as a batch of jobs")
    async def submit_batch(
        options: Annotated[dict[str, Any], Depends(option_fields)],
        images: Annotated[list[UploadFile] | None, File(description="Image files (repeat the field)")] = None,
        archive: Annotated[UploadFile | None, File(description="A zip of images")] = None,
        webhook_url: Annotated[str | None, Form()] = None,
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        principal = principal_of(authorization)
        await run_in_threadpool(check_rate, jobs.backend, principal)
        files = list(images or [])
        if len(files) > settings.max_files_per_batch:
            raise TooManyFilesError(
                f"{len(files)} files in one batch; the limit is {settings.max_files_per_batch}",
                details={"files": len(files), "max_files": settings.max_files_per_batch},
            )
        uploads = await run_in_threadpool(_read_uploads, files, settings)
        if archive is not None:
            uploads += await run_in_threadpool(_unzip, archive.file, settings)
        if not uploads:
            raise InvalidOptionError("send images in `images` or a zip in `archive`")
        if len(uploads) > settings.max_files_per_batch:
            raise TooManyFilesError(f"{len(uploads)} images; the limit is {settings.max_files_per_batch}",
                                    details={"files": len(uploads), "max_files": settings.max_files_per_batch})
        if options.get("subject"):
            raise InvalidOptionError("subject=true applies to one job's photos (POST /v1/jobs), not to a batch",
                                     details={"option": "subject"})
        values = options
        batch_id, existed = await run_in_threadpool(
            _submit, principal, uploads, values, webhook_url or None, idempotency_key, batch=True)
        batch = await _recorded_batch(principal, batch_id, existed)
        return JSONResponse(
            {"id": batch_id, "status": "running", "status_url": f"/v1/batches/{batch_id}",
             "jobs": batch["job_ids"]},
            status_code=202, headers={"Location": f"/v1/batches/{batch_id}"},
        )

    # ------------------------------------------------------------------ reads

    @app.get("/v1/jobs", summary="This key's recent jobs, newest first")
    def list_jobs(
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        principal = principal_of(authorization)
        return {"jobs": [public_job(d, jobs, base_url=base_url()) for d in jobs.list_for(principal.owner, limit)]}

    @app.get("/v1/jobs/{job_id}", summary="Status, progress, timings, errors, artifacts and result")
    def get_job(job_id: str, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        principal = principal_of(authorization)
        doc = jobs.get_for(principal.owner, job_id)
        return public_job(doc, jobs, state.store, include_result=True, base_url=base_url())

    @app.get("/v1/jobs/{job_id}/artifacts/{name:path}", summary="Download one artifact",
             response_class=Response)
    def get_artifact(job_id: str, name: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        principal = principal_of(authorization)
        doc = jobs.get_for(principal.owner, job_id)
        if doc["status"] != SUCCEEDED:
            if doc["status"] in (QUEUED, RUNNING):
                raise JobNotFinishedError("the job has not finished yet", details={"status": doc["status"]})
            raise NotFoundError("the job has no artifacts", details={"status": doc["status"]})
        artifact = next((a for a in doc["artifacts"] if a["name"] == name), None)
        if artifact is None:
            raise NotFoundError("no such artifact", details={"name": name})
        headers = {"ETag": f'"{artifact["sha256"]}"', "X-Checksum-SHA256": artifact["sha256"]}
        path = state.store.local_path(artifact["key"])
        filename = PurePosixPath(name).name
        if path is not None:
            return FileResponse(path, media_type=artifact["media_type"], filename=filename, headers=headers,
                                content_disposition_type="inline")
        headers["Content-Length"] = str(artifact["size"])
        return StreamingResponse(state.store.iter_chunks(artifact["key"]), media_type=artifact["media_type"],
                                 headers=headers)

    def _notify_canceled(doc: dict[str, Any]) -> None:
        """Publish the `job.canceled` webhook of a job that has a `webhook_url`. Two DELETEs racing on
        one job may both publish it; the delivery task claims each attempt once, so it is sent once."""
        if not doc.get("webhook_url"):
            return
        try:
            publish_webhook(state.celery, doc["id"], f"job.{CANCELED}", 1, doc["queue"])
        except Exception as error:  # the cancel stands; the sweeper publishes the due webhook later
            log.warning("could not publish the job.canceled webhook: %s", error, extra={"job_id": doc["id"]})

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a queued or running job; remove a finished one")
    def delete_job(job_id: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        principal = principal_of(authorization)
        check_rate(jobs.backend, principal)
        doc = jobs.get_for(principal.owner, job_id)
        if doc["status"] in (QUEUED, RUNNING):
            current = jobs.cancel(job_id)
            if current is None:  # removed by another request meanwhile
                raise NotFoundError("no such job", details={"job_id": job_id})
            if current["status"] == CANCELED:
                _notify_canceled(current)
                return JSONResponse(public_job(current, jobs, base_url=base_url()), status_code=200)
            # It succeeded or failed between the lookup and the cancel: a finished job, so remove it.
        _remove(job_id)
        return Response(status_code=204)

    def _remove(job_id: str) -> None:
        """Delete a job's files, then its record (which stays, for a retry or the sweeper, when the
        files cannot be removed now: 503)."""
        from headforge.service.tasks import remove_job

        try:
            remove_job(jobs, state.store, job_id)
        except OSError as error:
            raise store_os_error(error, "delete", f"inputs/{job_id}") from error

    @app.get("/v1/batches/{batch_id}", summary="Counts and progress of a batch")
    def get_batch(batch_id: str, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        principal = principal_of(authorization)
        batch = jobs.get_batch_for(principal.owner, batch_id)
        return public_batch(batch, jobs.get_many(batch["job_ids"]), base_url=base_url())

    @app.get("/v1/batches/{batch_id}/archive", summary="One zip with every artifact of a finished batch",
             response_class=Response)
    def get_batch_archive(batch_id: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        principal = principal_of(authorization)
        batch = jobs.get_batch_for(principal.owner, batch_id)
        docs = jobs.get_many(batch["job_ids"])
        unfinished = [d["id"] for d in docs if d is not None and d["status"] not in TERMINAL]
        if unfinished:
            raise JobNotFinishedError("the batch is still running", details={"unfinished": len(unfinished)})
        spool = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115 (closed by stream())
        with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            summary = public_batch(batch, docs)
            archive.writestr("batch.json", json.dumps(summary, indent=2))
            for number, (name, doc) in enumerate(zip(batch["names"], docs, strict=True)):
                if doc is None or doc["status"] != SUCCEEDED:
                    continue
                folder = f"{number:03d}_{PurePosixPath(name).stem}"
                for artifact in doc["artifacts"]:
                    with archive.open(f"{folder}/{artifact['name']}", "w", force_zip64=True) as target:
                        for chunk in state.store.iter_chunks(artifact["key"]):
                            target.write(chunk)
        size = spool.tell()
        spool.seek(0)

        def stream() -> Iterator[bytes]:
            with spool:
                while block := spool.read(1024 * 1024):
                    yield block

        return StreamingResponse(stream(), media_type="application/zip", headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{batch_id}.zip"',
        })

    @app.delete("/v1/batches/{batch_id}", summary="Cancel or remove every job of a batch")
    def delete_batch(batch_id: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        principal = principal_of(authorization)
        check_rate(jobs.backend, principal)
        batch = jobs.get_batch_for(principal.owner, batch_id)
        for job_id in batch["job_ids"]:
            jobs.cancel(job_id)
            _remove(job_id)
        jobs.delete_batch(batch_id)
        return Response(status_code=204)

    # ------------------------------------------------------------------ discovery and operations

    @app.get("/v1/models", summary="Pipelines and model versions, and whether each is available")
    def list_models(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        principal_of(authorization)
        return describe_models()

    @app.get("/v1/schemas/result", summary="JSON Schema of result.json")
    def result_schema() -> Response:
        path = Path(__file__).resolve().parents[1] / "schemas" / "result.schema.json"
        if not path.is_file():
            raise NotFoundError("the result schema is not installed")
        return Response(path.read_bytes(), media_type="application/schema+json")

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: job store, artifact store and broker reachable")
    def readyz() -> Response:
        checks: dict[str, str] = {}
        failures: dict[str, str] = {}
        for name, probe in (("state", jobs.backend.ping), ("store", state.store.ping),
                            ("broker", lambda: _ping_broker(state.celery))):
            try:
                probe()
                checks[name] = "ok"
            except Exception as error:
                failures[name] = str(getattr(error, "message", error))
        if failures:
            names = ", ".join(sorted(failures))
            return error_response(ServiceUnavailableError(
                f"not ready: {names} unreachable", details={"failed": failures, "ok": checks}))
        return JSONResponse({"status": "ready", "checks": checks, "workers": jobs.live_workers()})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        try:
            payload = generate_latest(registry)
        except HeadforgeError:
            raise
        return Response(payload, media_type=CONTENT_TYPE_LATEST)

    if (STATIC_DIR / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="web")

    return app


def _ping_broker(celery: Any) -> None:
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def describe_models() -> dict[str, Any]:
    """Every registered pipeline with availability, and the default networks' versions."""
    from headforge.models.runtime import DEFAULT_NETWORK_NAMES
    from headforge.pipeline.run import PIPELINES, pipeline_missing_reason

    pipelines = []
    for name, entry in sorted(PIPELINES.items()):
        try:
            reason = pipeline_missing_reason(name)
        except Exception as error:  # a broken optional pipeline must not break the listing
            reason = f"{type(error).__name__}: {error}"
        pipelines.append({"name": name, "description": entry.description, "available": reason is None,
                          "reason": reason, "queue": entry.queue, "networks": list(entry.networks)})
    from headforge.export.repository import read_entry
    from headforge.models.pull import DEFAULT_VERSION

    models = []
    for name in DEFAULT_NETWORK_NAMES:
        model = read_entry(name, DEFAULT_VERSION)
        manifest = model.manifest if model is not None else {}
        models.append({
            "name": name,
            "version": DEFAULT_VERSION,
            "available": bool(model is not None and model.model_path.is_file()),
            "sha256": manifest.get("model_sha256"),
        })
    from headforge.templates import list_templates

    return {"pipelines": pipelines, "models": models, "templates": list_templates()}


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory headforge.service.app:app_from_env`."""
    return create_app()

