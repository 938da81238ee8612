"""Submitting work: validate the options and uploads, store the bytes, record the jobs (and batch)
and publish their ids; wait for a job to finish (`?wait=`). The service moves bytes and ids only."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from fastapi import Response
from fastapi.concurrency import run_in_threadpool

from headforge.errors import IdempotencyInProgressError, InvalidOptionError, NotFoundError
from headforge.service import webhooks
from headforge.service.auth import Principal
from headforge.service.celery_app import dispatch
from headforge.service.contracts import Job, JobAccepted
from headforge.service.deps import ServiceState
from headforge.service.jobs import QUEUED, TERMINAL, new_id
from headforge.service.store import store_os_error
from headforge.service.uploads import Upload, fingerprint, validate_image, validate_options
from headforge.service.views import public_job

log = logging.getLogger("headforge.api")

# How long a request whose Idempotency-Key another request has reserved waits for that request's
# batch record before it is told to retry (409 `idempotency_in_progress`).
IDEMPOTENCY_WAIT_SECONDS = 10.0


def _reserve(
    state: ServiceState, principal: Principal, key: str | None, print_: str, new_resource: str
) -> str | None:
    if not key:
        return None
    if len(key) > 255:
        raise InvalidOptionError("Idempotency-Key must be at most 255 characters")
    return state.jobs.reserve_idempotency(principal.owner, key, print_, new_resource)


def submit(
    state: ServiceState,
    principal: Principal,
    uploads: list[Upload],
    options_in: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
    *,
    batch: bool,
) -> tuple[str, bool]:
    """Validate, store and enqueue; return (job or batch id, whether it already existed)."""
    settings, jobs = state.settings, state.jobs
    options = validate_options(options_in)
    if webhook_url:
        webhooks.check_webhook_url(webhook_url, settings.webhook_allow_private)
    inputs_meta = [validate_image(upload, settings, state.decode_gate) for upload in uploads]
    kind = "batch" if batch else "job"
    resource_id = new_id(kind)
    existing = _reserve(
        state, principal, idempotency_key, fingerprint(kind, uploads, options, webhook_url), resource_id
    )
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
                inputs.append(
                    {
                        "key": key,
                        "filename": uploads[i].filename,
                        "size": len(uploads[i].data),
                        "sha256": hashlib.sha256(uploads[i].data).hexdigest(),
                        **inputs_meta[i],
                    }
                )
            job_inputs.append(inputs)
        for job_id, group, inputs in zip(job_ids, groups, job_inputs, strict=True):
            jobs.create_job(
                job_id=job_id,
                owner=principal.owner,
                options=options,
                inputs=inputs,
                queue=queue,
                webhook_url=webhook_url,
                batch_id=resource_id if batch else None,
                label=uploads[group[0]].filename,
            )
        if batch:
            jobs.create_batch(
                batch_id=resource_id,
                owner=principal.owner,
                job_ids=job_ids,
                names=[u.filename for u in uploads],
            )
    except BaseException:
        if writing:
            _discard(state, job_ids)
        if idempotency_key:
            jobs.release_idempotency(principal.owner, idempotency_key)
        raise
    for job_id in job_ids:
        try:
            dispatch(state.celery, jobs, job_id, queue)
        except Exception as error:  # the job is recorded; the sweeper publishes it later
            log.warning("publish failed, the sweeper will retry: %s", error, extra={"job_id": job_id})
    return resource_id, False


def _discard(state: ServiceState, job_ids: list[str]) -> None:
    """Best effort: remove what a failed submission stored or recorded, so none of it runs."""
    for job_id in job_ids:
        try:
            state.jobs.delete(job_id)
            state.store.delete_prefix(f"inputs/{job_id}/")
        except Exception as error:  # the store or state is what failed (docs/service.md, Store errors)
            log.warning("could not discard a failed submission: %s", error, extra={"job_id": job_id})


async def recorded_batch(
    state: ServiceState, principal: Principal, batch_id: str, existed: bool
) -> dict[str, Any]:
    """The batch record. A repeat whose Idempotency-Key an earlier request holds may arrive
    before that request has recorded its batch: wait for it a while, then ask for a retry."""
    deadline = time.monotonic() + (IDEMPOTENCY_WAIT_SECONDS if existed else 0.0)
    while True:
        try:
            return await run_in_threadpool(state.jobs.get_batch_for, principal.owner, batch_id)
        except NotFoundError:
            if not existed or time.monotonic() >= deadline:
                if not existed:
                    raise
                raise IdempotencyInProgressError(
                    "an earlier request with this Idempotency-Key is still being stored; retry shortly",
                    details={"id": batch_id, "retry_after": 1},
                ) from None
        await asyncio.sleep(0.05)


def _aioredis_client(state: ServiceState) -> Any:
    if not state.aio_redis:
        import redis.asyncio

        state.aio_redis.append(
            redis.asyncio.Redis.from_url(state.settings.redis_url or "", socket_connect_timeout=2)
        )
    return state.aio_redis[0]


async def wait_finished(state: ServiceState, job_id: str, seconds: float) -> dict[str, Any] | None:
    """The job once finished, or None after `seconds`. With Redis, a pub/sub message from the
    worker wakes the request at once; a slow poll covers a lost message (and SQLite)."""
    deadline = time.monotonic() + seconds
    subscription = None
    if state.settings.redis_url:
        subscription = _aioredis_client(state).pubsub()
        await subscription.subscribe(f"hf:notify:done:{job_id}")
    try:
        poll = 0.02 if subscription is None else 0.5
        while True:
            doc = await run_in_threadpool(state.jobs.get, job_id)
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


def accepted(state: ServiceState, job_id: str, response: Response) -> JobAccepted:
    """The 202 body of a job taken on, with its `Location`."""
    doc = state.jobs.get(job_id)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return JobAccepted.model_validate(
        {"id": job_id, "status": doc["status"] if doc else QUEUED, "status_url": f"/v1/jobs/{job_id}"}
    )


async def job_answer(state: ServiceState, job_id: str, wait: int, response: Response) -> JobAccepted | Job:
    """What a submit answers: with `wait`, the finished job (200) if it finishes in time; else the
    202 `JobAccepted`."""
    if wait:
        doc = await wait_finished(state, job_id, float(wait))
        if doc is not None:
            body = await run_in_threadpool(public_job, doc, state.jobs, state.store, include_result=True)
            response.status_code = 200
            return Job.model_validate(body)
    return await run_in_threadpool(accepted, state, job_id, response)
