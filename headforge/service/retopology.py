"""`POST /v1/retopology`: a head mesh upload becomes a job that fits a stored studio template onto it.

The gateway checks the options (the template must be stored), the file's name, size and declared
vertex and face counts, stores the upload and enqueues the job; a worker runs the fit
(`headforge.pipeline.retopology.retopologize`). The job is like any other: `GET /v1/jobs/{id}` for
status, `GET /v1/jobs/{id}/artifacts/fitted.glb` (or `fitted.obj`, `fitted.mtl`, `result.json`) for
the output, `DELETE` to cancel.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from headforge.errors import EmptyFileError, FileTooLargeError
from headforge.service.auth import Principal
from headforge.service.celery_app import dispatch
from headforge.service.contracts import Job, JobAccepted
from headforge.service.deps import CurrentPrincipal, ServiceState, State
from headforge.service.http_errors import documented
from headforge.service.jobs import new_id
from headforge.service.ratelimit import check_rate
from headforge.service.submission import job_answer

log = logging.getLogger("headforge.api")
router = APIRouter(tags=["retopology"])
MAX_WAIT_SECONDS = 300
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
RETOPOLOGY_QUEUE_KEY = "retopology"  # HEADFORGE_QUEUE_ROUTES may send these jobs to their own queue


@router.post(
    "/v1/retopology",
    status_code=202,
    summary="Fit a stored studio template onto an uploaded head mesh",
    response_model=JobAccepted | Job,
    responses={
        200: {"model": Job, "description": "With `wait`: the job finished in time"},
        **documented(400, 401, 413, 415, 422, 429, 503),
    },
)
async def submit_retopology(
    state: State,
    principal: CurrentPrincipal,
    response: Response,
    mesh: Annotated[UploadFile, File(description="The head mesh: .obj, .glb or .ply")],
    template: Annotated[str, Form(description="A stored template (GET /v1/models lists them)")],
    target_landmarks: Annotated[
        str,
        Form(description="auto, flame (5023-vertex FLAME head), mediapipe (468-vertex face mesh) or none"),
    ] = "auto",
    units: Annotated[str, Form(description="The mesh's length unit (m, cm, mm), for the report in mm")] = "m",
    outputs: Annotated[str, Form(description="glb, obj or both (comma-separated)")] = "glb,obj",
    wait: Annotated[int, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for the result")] = 0,
) -> JobAccepted | Job:
    from headforge.pipeline.retopology import TARGET_SUFFIXES, check_declared_size, retopology_options

    await run_in_threadpool(check_rate, state.jobs.backend, principal)
    settings = state.settings
    data = await run_in_threadpool(mesh.file.read, settings.max_upload_bytes + 1)
    filename = _safe_name(mesh.filename)
    if len(data) > settings.max_upload_bytes:
        raise FileTooLargeError(
            f"{filename} is over the {settings.max_upload_bytes} byte limit",
            details={"filename": filename, "max_bytes": settings.max_upload_bytes},
        )
    if not data:
        raise EmptyFileError(f"{filename} is empty", details={"filename": filename})
    options = await run_in_threadpool(
        retopology_options,
        {"template": template, "target_landmarks": target_landmarks, "units": units, "outputs": outputs},
    )
    check_declared_size(data, filename, TARGET_SUFFIXES)
    job_id = await run_in_threadpool(_create, state, principal, filename, data, options)
    return await job_answer(state, job_id, wait, response)


def _safe_name(name: str | None) -> str:
    """The upload's base name with anything but letters, digits, '.', '_' and '-' replaced (store keys)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    cleaned = _UNSAFE.sub("_", base).strip("._")[:100]
    return cleaned or "mesh"


def _create(
    state: ServiceState, principal: Principal, filename: str, data: bytes, options: dict[str, Any]
) -> str:
    """Store the upload, record the job and publish it (the sweeper republishes a failed publish)."""
    jobs = state.jobs
    jobs.check_quota(principal.owner, 1, principal.max_queued)
    job_id = new_id("job")
    key = f"inputs/{job_id}/0-{filename}"
    state.store.put_bytes(key, data)
    queue = state.settings.queue_routes.get(RETOPOLOGY_QUEUE_KEY, "cpu")
    try:
        jobs.create_job(
            job_id=job_id, owner=principal.owner, options=options, queue=queue, label=filename,
            inputs=[{"key": key, "filename": filename, "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}],
        )  # fmt: skip
    except BaseException:
        state.store.delete_prefix(f"inputs/{job_id}/")
        raise
    try:
        dispatch(state.celery, jobs, job_id, queue)
    except Exception as error:  # recorded; the sweeper publishes it later
        log.warning("publish failed, the sweeper will retry: %s", error, extra={"job_id": job_id})
    return job_id
