"""`/v1/batches`: many images (or one zip) as one job each, read together, zipped, deleted together."""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from headforge.errors import InvalidOptionError, JobNotFinishedError, TooManyFilesError
from headforge.service.contracts import Batch, BatchAccepted
from headforge.service.deps import CurrentPrincipal, State
from headforge.service.forms import option_fields
from headforge.service.http_errors import documented
from headforge.service.jobs import SUCCEEDED, TERMINAL
from headforge.service.ratelimit import check_rate
from headforge.service.routes.jobs import remove_job_files
from headforge.service.submission import recorded_batch, submit
from headforge.service.uploads import read_uploads, unzip
from headforge.service.views import public_batch

router = APIRouter(tags=["batches"])


@router.post(
    "/v1/batches",
    status_code=202,
    summary="Submit many images (or one zip) as a batch of jobs",
    responses=documented(400, 401, 409, 413, 415, 422, 429, 503),
)
async def submit_batch(
    state: State,
    principal: CurrentPrincipal,
    response: Response,
    options: Annotated[dict[str, Any], Depends(option_fields)],
    images: Annotated[list[UploadFile] | None, File(description="Image files (repeat the field)")] = None,
    archive: Annotated[UploadFile | None, File(description="A zip of images")] = None,
    webhook_url: Annotated[str | None, Form()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> BatchAccepted:
    settings = state.settings
    await run_in_threadpool(check_rate, state.jobs.backend, principal)
    files = list(images or [])
    if len(files) > settings.max_files_per_batch:
        raise TooManyFilesError(
            f"{len(files)} files in one batch; the limit is {settings.max_files_per_batch}",
            details={"files": len(files), "max_files": settings.max_files_per_batch},
        )
    uploads = await run_in_threadpool(read_uploads, files, settings)
    if archive is not None:
        uploads += await run_in_threadpool(unzip, archive.file, settings)
    if not uploads:
        raise InvalidOptionError("send images in `images` or a zip in `archive`")
    if len(uploads) > settings.max_files_per_batch:
        raise TooManyFilesError(
            f"{len(uploads)} images; the limit is {settings.max_files_per_batch}",
            details={"files": len(uploads), "max_files": settings.max_files_per_batch},
        )
    if options.get("subject"):
        raise InvalidOptionError(
            "subject=true applies to one job's photos (POST /v1/jobs), not to a batch",
            details={"option": "subject"},
        )
    batch_id, existed = await run_in_threadpool(
        submit, state, principal, uploads, options, webhook_url or None, idempotency_key, batch=True
    )
    batch = await recorded_batch(state, principal, batch_id, existed)
    response.headers["Location"] = f"/v1/batches/{batch_id}"
    return BatchAccepted(
        id=batch_id, status="running", status_url=f"/v1/batches/{batch_id}", jobs=batch["job_ids"]
    )


@router.get(
    "/v1/batches/{batch_id}",
    summary="Counts and progress of a batch",
    response_model=Batch,
    response_model_exclude_unset=True,
    responses=documented(401, 404),
)
def get_batch(batch_id: str, state: State, principal: CurrentPrincipal) -> Batch:
    # exclude_unset: a deleted job's entry has only id, filename and status, as `public_batch` writes it.
    batch = state.jobs.get_batch_for(principal.owner, batch_id)
    return Batch.model_validate(public_batch(batch, state.jobs.get_many(batch["job_ids"])))


@router.get(
    "/v1/batches/{batch_id}/archive",
    summary="One zip with every artifact of a finished batch",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "The batch's artifacts"},
        **documented(401, 404, 409),
    },
)
def get_batch_archive(batch_id: str, state: State, principal: CurrentPrincipal) -> Response:
    batch = state.jobs.get_batch_for(principal.owner, batch_id)
    docs = state.jobs.get_many(batch["job_ids"])
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

    return StreamingResponse(
        stream(),
        media_type="application/zip",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{batch_id}.zip"',
        },
    )


@router.delete(
    "/v1/batches/{batch_id}",
    summary="Cancel or remove every job of a batch",
    status_code=204,
    response_class=Response,
    responses=documented(401, 404, 429, 503),
)
def delete_batch(batch_id: str, state: State, principal: CurrentPrincipal) -> Response:
    check_rate(state.jobs.backend, principal)
    batch = state.jobs.get_batch_for(principal.owner, batch_id)
    for job_id in batch["job_ids"]:
        state.jobs.cancel(job_id)
        remove_job_files(state, job_id)
    state.jobs.delete_batch(batch_id)
    return Response(status_code=204)
