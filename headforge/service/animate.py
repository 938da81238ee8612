"""`POST /v1/jobs/{job_id}/animate`: drive a finished FLAME job's heads with a sequence of FLAME
expression and jaw parameters, as a job of its own.

The body is the sequence document of `headforge animate` (headforge/pipeline/animate.py):
`{"fps": 30, "frames": [{"expression": [K numbers], "jaw": [3 numbers]}, …]}`, plus `"image": i`
for a job of several photos (which photo's heads to drive; default 0). The gateway checks the body
against the source job's result.json (its heads' K, the frame cap, the size of what the frames will
weigh), stores the sequence and enqueues a job whose inputs are the sequence and the source job's
result.json, splat PLYs and binding files; a worker runs `animate_result` and uploads a mesh PLY and
a splat PLY per frame and head, and `animation.json` (the job's `result`). The job is like any
other: `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/artifacts/f0000_h0_mesh.ply`, `DELETE`.

Refusals: `invalid_sequence` (422: not JSON, an expression array whose length is not K, a jaw that
is not 3 numbers, values out of range), `too_many_frames` (413: over `MAX_API_FRAMES`, or frames
that would weigh over `MAX_ANIMATION_BYTES`), `file_too_large` (413: a body over `MAX_BODY_BYTES`),
`not_animatable` (422: the job has no FLAME head, or is itself an animation or retopology job),
`job_not_finished` (409), `not_found` (404).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from headforge.errors import (
    FileTooLargeError,
    InvalidSequenceError,
    JobNotFinishedError,
    NotAnimatableError,
    TooManyFramesError,
)
from headforge.service.celery_app import dispatch
from headforge.service.contracts import Job, JobAccepted
from headforge.service.deps import CurrentPrincipal, State
from headforge.service.http_errors import documented
from headforge.service.jobs import QUEUED, RUNNING, SUCCEEDED, new_id
from headforge.service.ratelimit import check_rate
from headforge.service.submission import job_answer

if TYPE_CHECKING:
    from headforge.service.jobs import Claim

log = logging.getLogger("headforge.api")
router = APIRouter()

ANIMATE_TASK = "animate"  # job options["task"]; tasks.py hands these jobs to `execute_animation`
ANIMATE_QUEUE_KEY = "animate"  # HEADFORGE_QUEUE_ROUTES may send these jobs to their own queue
MAX_API_FRAMES = 300  # 10 s at 30 fps per request; longer sequences go in several requests
MAX_ANIMATION_BYTES = 512 * 1024 * 1024  # what one job's frame files may weigh in all
MAX_BODY_BYTES = 4 * 1024 * 1024  # 300 frames of 50 expression values in JSON take about 0.4 MB
MAX_WAIT_SECONDS = 300
MESH_PLY_BYTES = 200_000  # a FLAME frame mesh (5023 vertices, 9976 triangles) in binary PLY
SEQUENCE_NAME = "sequence.json"


@router.post(
    "/v1/jobs/{job_id}/animate",
    status_code=202,
    summary="Drive a finished FLAME job's heads with FLAME expression and jaw frames (a new job)",
    response_model=JobAccepted | Job,
    responses={
        200: {"model": Job, "description": "With `wait`: the job finished in time"},
        **documented(401, 404, 409, 413, 422, 429, 503),
    },
)
async def submit_animation(
    job_id: str,
    request: Request,
    state: State,
    principal: CurrentPrincipal,
    response: Response,
    wait: Annotated[int, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for the result")] = 0,
) -> JobAccepted | Job:
    await run_in_threadpool(check_rate, state.jobs.backend, principal)
    body = await _read_body(request)
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidSequenceError(f"the body is not JSON: {error}") from None
    plan = await run_in_threadpool(_plan, state, principal.owner, job_id, document)
    animation_id = await run_in_threadpool(_create, state, principal, plan)
    return await job_answer(state, animation_id, wait, response)


async def _read_body(request: Request) -> bytes:
    """The request body, refused with 413 past `MAX_BODY_BYTES` (read no further)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise FileTooLargeError(
                f"the animation request is over the {MAX_BODY_BYTES} byte limit",
                details={"max_bytes": MAX_BODY_BYTES},
            )
        parts.append(chunk)
    return b"".join(parts)


def _plan(state: Any, owner: str, job_id: str, document: object) -> dict[str, Any]:
    """Check the request against the source job; return the new job's options and inputs."""
    from headforge.pipeline.animate import head_expressions, head_splat_files, head_stem, parse_sequence

    source = state.jobs.get_for(owner, job_id)
    if source["status"] in (QUEUED, RUNNING):
        raise JobNotFinishedError("the job has not finished yet", details={"status": source["status"]})
    if source["status"] != SUCCEEDED or not source.get("result_key"):
        raise NotAnimatableError(
            f"the job {source['status']}: it has no heads", details={"status": source["status"]}
        )
    if source["options"].get("task") is not None:
        raise NotAnimatableError(
            f"a {source['options']['task']} job has no FLAME heads to animate", details={"job_id": job_id}
        )
    if not isinstance(document, dict):
        raise InvalidSequenceError('the body must be a JSON object with a "frames" list')
    sequence = dict(document)
    image = sequence.pop("image", None)
    result = json.loads(state.store.get_bytes(source["result_key"]))
    if isinstance(result.get("images"), list):  # several photos, each its own capture: files under "i/"
        image = 0 if image is None else image
        if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < len(result["images"]):
            raise InvalidSequenceError(
                f"image must be a photo index from 0 to {len(result['images']) - 1}", details={"image": image}
            )
        result, prefix = result["images"][image], f"{image}/"
    elif image not in (None, 0):
        raise InvalidSequenceError(
            "image must be 0 (or absent): the job has one capture", details={"image": image}
        )
    else:
        prefix = ""
    heads = [head for head in result.get("heads", []) if head_expressions(head) is not None]
    if not heads:
        raise NotAnimatableError(
            "the job has no animatable head: animation needs the flame pipeline "
            "(its heads carry FLAME parameters and morph targets)",
            details={"pipeline": result.get("pipeline"), "job_id": job_id},
        )
    expressions = {head_expressions(head) for head in heads}
    if len(expressions) != 1:
        raise NotAnimatableError("the job's heads animate different expression counts")
    count = int(expressions.pop() or 0)
    artifacts = {a["name"]: a for a in source["artifacts"]}
    splat_files = [head_splat_files(head) for head in heads]
    wanted = ["result.json"] + [name for pair in splat_files if pair is not None for name in pair]
    files = [artifacts[prefix + name] | {"local": name} for name in wanted if prefix + name in artifacts]
    frames = document.get("frames")
    frame_count = len(frames) if isinstance(frames, list) else 0
    per_frame = sum(
        MESH_PLY_BYTES + (0 if pair is None else int(artifacts.get(prefix + pair[0], {}).get("size", 0)))
        for pair in splat_files
    )
    if frame_count * per_frame > MAX_ANIMATION_BYTES:
        raise TooManyFramesError(
            f"{frame_count} frames of {len(heads)} head(s) would weigh about {frame_count * per_frame} bytes, "
            f"over the {MAX_ANIMATION_BYTES} byte limit: send at most {MAX_ANIMATION_BYTES // per_frame} frames",
            details={"frames": frame_count, "max_frames": MAX_ANIMATION_BYTES // per_frame},
        )
    parsed = parse_sequence(sequence, count, max_frames=MAX_API_FRAMES)
    options = {
        "task": ANIMATE_TASK,
        "source_job": job_id,
        "image": image,
        "heads": [head_stem(head) for head in heads],
        "expressions": count,
        "frames": len(parsed.expression),
        "fps": parsed.fps,
    }
    return {"options": options, "sequence": json.dumps(sequence).encode(), "files": files}


def _create(state: Any, principal: Any, plan: dict[str, Any]) -> str:
    """Store the sequence, record the job and publish it (the sweeper republishes a failed publish)."""
    jobs = state.jobs
    jobs.check_quota(principal.owner, 1, principal.max_queued)
    job_id = new_id("job")
    key = f"inputs/{job_id}/{SEQUENCE_NAME}"
    data: bytes = plan["sequence"]
    state.store.put_bytes(key, data)
    inputs = [
        {"key": key, "filename": SEQUENCE_NAME, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ]
    inputs += [
        {"key": item["key"], "filename": item["local"], "size": item["size"], "sha256": item["sha256"]}
        for item in plan["files"]
    ]
    queue = state.settings.queue_routes.get(ANIMATE_QUEUE_KEY, "cpu")
    try:
        jobs.create_job(job_id=job_id, owner=principal.owner, options=plan["options"], queue=queue,
                        label=f"animate {plan['options']['source_job']}", inputs=inputs)  # fmt: skip
    except BaseException:
        state.store.delete_prefix(f"inputs/{job_id}/")
        raise
    try:
        dispatch(state.celery, jobs, job_id, queue)
    except Exception as error:  # recorded; the sweeper publishes it later
        log.warning("publish failed, the sweeper will retry: %s", error, extra={"job_id": job_id})
    return job_id


# --------------------------------------------------------------------------- worker side


def execute_animation(
    ctx: Any, claim: Claim, beat: Any
) -> tuple[list[dict[str, Any]], str, dict[str, float]]:
    """An animation job on a worker: fetch the sequence and the source head files, run
    `animate_result`, upload the frames. Returns artifacts, the result key and timings."""
    from headforge.pipeline.animate import animate_result
    from headforge.service.tasks import _upload_outputs

    job = claim.job
    prefix = f"jobs/{job['id']}/{claim.token}/"
    with tempfile.TemporaryDirectory(prefix="animate-", dir=ctx.store.scratch_dir()) as scratch:
        source = Path(scratch) / "source"
        frames = Path(scratch) / "frames"
        source.mkdir()
        document: object = None
        for item in job["inputs"]:
            data = ctx.store.get_bytes(item["key"])  # not_found when the source job was removed meanwhile
            if item["filename"] == SEQUENCE_NAME:
                document = json.loads(data)
            else:
                (source / Path(item["filename"]).name).write_bytes(data)
        started = time.perf_counter()
        summary = animate_result(source, document, frames, progress=lambda f: beat.report("animate", f))
        animate_ms = (time.perf_counter() - started) * 1000
        upload_started = time.perf_counter()
        artifacts = _upload_outputs(ctx.store, frames, prefix, "", summary)
        upload_ms = (time.perf_counter() - upload_started) * 1000
    return (
        artifacts,
        f"{prefix}animation.json",
        {"animate": round(animate_ms, 2), "upload": round(upload_ms, 2)},
    )
