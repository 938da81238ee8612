"""Celery tasks (`run_job`, `deliver_webhook`), per-process model loading and the sweeper.

`run_job` receives only a job id. It claims the job in the job store (a lease with a token), reads
the uploads from the artifact store, calls `reconstruct_capture` (the same call the CLI makes),
uploads every file it wrote under an attempt-specific prefix, and then completes the job with a
compare-and-set on its lease token. Whatever the broker does (redelivery after a crash, a
duplicate from the sweeper), only one attempt can complete a job, and the artifacts it records
are exactly the files that attempt wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from celery import bootsteps, signals
from celery.exceptions import SoftTimeLimitExceeded

from headforge.errors import HeadforgeError, JobTimeoutError, WebhookHostUnresolvedError
from headforge.files import sha256_file
from headforge.service import webhooks
from headforge.service.celery_app import JOB_TASK, WEBHOOK_TASK, app, dispatch, publish_webhook
from headforge.service.jobs import FAILED, SUCCEEDED, TERMINAL, Claim, JobStore, make_backend
from headforge.service.metrics import record_stage_timings
from headforge.service.settings import Settings
from headforge.service.store import ArtifactStore, disk_full_is_transient, make_store, media_type_for
from headforge.service.views import public_job

log = logging.getLogger("headforge.worker")

WORKER_STORE_RETRY_SECONDS = 120.0  # ride out a Redis restart instead of failing the job
TRANSIENT_RETRY_BASE_SECONDS = 2.0
WEBHOOK_IN_FLIGHT_SECONDS = 30.0  # a delivery claimed this long ago with no outcome may be republished


class JobStopped(Exception):
    """The job was canceled, deleted or taken over while this attempt ran."""


class _ProcessContext:
    """Settings, stores and networks, created once per process (after fork)."""

    def __init__(self, retry_seconds: float = WORKER_STORE_RETRY_SECONDS) -> None:
        self.pid = os.getpid()
        self.settings = Settings.from_env()
        self.jobs = JobStore(make_backend(self.settings, retry_seconds=retry_seconds), self.settings)
        self.store: ArtifactStore = make_store(self.settings)
        self.networks: Any = None


_context: _ProcessContext | None = None


def context() -> _ProcessContext:
    global _context
    if _context is None or _context.pid != os.getpid():
        _context = _ProcessContext()
    return _context


def _load_networks(settings: Settings) -> Any:
    """The model set with the networks of the pipelines this worker's queues serve opened; logs
    "models loaded" with the pid, once per process by design."""
    from headforge.pipeline.process import prepare_process
    from headforge.pipeline.registry import PIPELINES

    queues = settings.worker_queues
    served = [name for name in sorted(PIPELINES) if not queues or settings.queue_for(name) in queues]
    networks = prepare_process([name for name in served if PIPELINES[name].missing_reason() is None])
    log.info("models loaded", extra={"pid": os.getpid()})
    return networks


def _import_pipeline() -> None:
    """Import every pipeline module (and with them trimesh, scipy, OpenCV) before any task runs.

    Done lazily inside the first job, the imports took seconds of its time limit, and a soft time
    limit that fired during one was lost: trimesh guards its optional imports with
    `except BaseException`, which swallowed `SoftTimeLimitExceeded`, and the job ran on."""
    from headforge.pipeline.process import import_pipeline_modules

    import_pipeline_modules()


@signals.worker_process_init.connect
def _warm_up(**_kwargs: Any) -> None:
    """Import the pipeline and load the models once in each pool process, right after fork (never
    per task)."""
    from headforge.observability import configure_logging

    ctx = context()
    configure_logging(json_logs=ctx.settings.json_logs)
    _import_pipeline()
    try:
        ctx.networks = _load_networks(ctx.settings)
    except HeadforgeError as error:  # e.g. models_missing: jobs will fail with this code
        log.error("models not loaded: %s", error.message, extra={"code": error.code})


# --------------------------------------------------------------------------- run_job


class _Heartbeat(threading.Thread):
    """Renews the job's lease and pushes progress while the pipeline runs."""

    def __init__(self, jobs: JobStore, job_id: str, token: str, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.jobs, self.job_id, self.token, self.interval = jobs, job_id, token, interval
        self.progress: dict[str, float] = {}
        self.overall = 0.0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.lost = threading.Event()

    def report(self, stage: str, fraction: float) -> None:
        """The pipeline's progress callback: mark earlier stages done, and stop when told to."""
        if self.lost.is_set():
            raise JobStopped("the job was canceled or taken over")
        with self.lock:
            for name in self.progress:
                if name != stage:
                    self.progress[name] = 1.0
            self.progress.setdefault(stage, 0.0)
            self.overall = max(self.overall, float(fraction))

    def push(self) -> None:
        with self.lock:
            snapshot = dict(self.progress)
            snapshot["overall"] = round(self.overall, 4)
        try:
            if not self.jobs.heartbeat(self.job_id, self.token, snapshot):
                self.lost.set()
        except HeadforgeError as error:  # store unreachable: keep trying; the lease may lapse
            log.warning("heartbeat failed: %s", error.message)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.push()


def _upload_outputs(
    store: ArtifactStore, folder: Path, prefix: str, name_prefix: str, document: dict[str, Any]
) -> list[dict[str, Any]]:
    """Move every file the pipeline wrote into the store; sizes and hashes come from the result
    document where it lists them (result.json itself is hashed here)."""
    known = {a["name"]: a for a in document.get("artifacts", []) if isinstance(a, dict) and "name" in a}
    artifacts = []
    moves: list[tuple[str, Path]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = str(path.relative_to(folder)).replace(os.sep, "/")
        name = name_prefix + relative
        key = f"{prefix}{name}"
        listed = known.get(relative)
        size = path.stat().st_size
        if listed is not None and listed.get("bytes") == size and listed.get("sha256"):
            digest = str(listed["sha256"])
        else:
            digest = sha256_file(path)
        moves.append((key, path))
        artifacts.append(
            {"name": name, "key": key, "size": size, "sha256": digest, "media_type": media_type_for(name)}
        )
    store.adopt_files(moves)
    return artifacts


def _execute(
    ctx: _ProcessContext, claim: Claim, beat: _Heartbeat
) -> tuple[list[dict[str, Any]], str, dict[str, float]]:
    """Run the pipeline on every input of the job and upload the outputs; return artifacts,
    the key of the result document and timings."""
    from headforge.pipeline.package import json_bytes
    from headforge.pipeline.run import ReconstructOptions, reconstruct_capture

    job = claim.job
    if job["options"].get("task") == "retopology":  # POST /v1/retopology (service/retopology.py)
        return _execute_retopology(ctx, claim)
    if job["options"].get("task") == "animate":  # POST /v1/jobs/{id}/animate (service/animate.py)
        from headforge.service.animate import execute_animation

        return execute_animation(ctx, claim, beat)
    options = ReconstructOptions.from_dict(job["options"])
    if ctx.networks is None:
        ctx.networks = _load_networks(ctx.settings)
    prefix = f"jobs/{job['id']}/{claim.token}/"
    inputs = job["inputs"]
    pipeline_ms = 0.0
    stage_ms: dict[str, float] = {}
    artifacts: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="job-", dir=ctx.store.scratch_dir()) as scratch:
        # With `subject`, all photos form one capture (one result.json listing the views); without,
        # each photo is its own capture.
        captures = [inputs] if options.subject else [[item] for item in inputs]
        for index, capture in enumerate(captures):
            photos = [(item["filename"], ctx.store.get_bytes(item["key"])) for item in capture]
            out_dir = Path(scratch) / str(index)

            def progress(stage: str, fraction: float, index: int = index) -> None:
                beat.report(stage, (index + fraction) / len(captures))

            started = time.perf_counter()
            document = reconstruct_capture(photos, options, out_dir, progress, networks=ctx.networks)
            pipeline_ms += (time.perf_counter() - started) * 1000
            for stage, value in document.get("timings_ms", {}).items():
                if stage != "total" and isinstance(value, int | float):
                    stage_ms[stage] = stage_ms.get(stage, 0.0) + float(value)
            documents.append(document)
            if beat.lost.is_set():
                raise JobStopped("the job was canceled or taken over")
        upload_started = time.perf_counter()
        if len(captures) == 1:
            artifacts = _upload_outputs(ctx.store, Path(scratch) / "0", prefix, "", documents[0])
            result_key = f"{prefix}result.json"
        else:
            for index in range(len(captures)):
                artifacts += _upload_outputs(
                    ctx.store, Path(scratch) / str(index), prefix, f"{index}/", documents[index]
                )
            combined = Path(scratch) / "result.json"
            combined.write_bytes(json_bytes({"images": documents}))
            combined_entry = {
                "name": "result.json",
                "key": f"{prefix}result.json",
                "size": combined.stat().st_size,
                "sha256": sha256_file(combined),
                "media_type": "application/json",
            }
            ctx.store.adopt_file(f"{prefix}result.json", combined)
            artifacts.insert(0, combined_entry)
            result_key = f"{prefix}result.json"
        upload_ms = (time.perf_counter() - upload_started) * 1000
    timings = {
        **{k: round(v, 2) for k, v in stage_ms.items()},
        "pipeline": round(pipeline_ms, 2),
        "upload": round(upload_ms, 2),
    }
    return artifacts, result_key, timings


def _execute_retopology(
    ctx: _ProcessContext, claim: Claim
) -> tuple[list[dict[str, Any]], str, dict[str, float]]:
    """A retopology job: the template fitted onto the uploaded mesh, its files uploaded."""
    from headforge.pipeline.retopology import retopologize

    job = claim.job
    prefix = f"jobs/{job['id']}/{claim.token}/"
    (item,) = job["inputs"]
    with tempfile.TemporaryDirectory(prefix="job-", dir=ctx.store.scratch_dir()) as scratch:
        started = time.perf_counter()
        document = retopologize(
            ctx.store.get_bytes(item["key"]), item["filename"], job["options"], Path(scratch)
        )
        fit_ms = (time.perf_counter() - started) * 1000
        artifacts = _upload_outputs(ctx.store, Path(scratch), prefix, "", document)
    return artifacts, f"{prefix}result.json", {"retopology": round(fit_ms, 2)}


@app.task(name=JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Any, job_id: str) -> dict[str, Any]:
    """Process one job. The return value holds artifact keys only (and is not stored)."""
    from headforge.observability import job_context

    ctx = context()
    with job_context(job_id):
        claim = ctx.jobs.claim(job_id)
        if not isinstance(claim, Claim):
            log.info("delivery skipped: %s", claim, extra={"reason": claim})
            if claim == FAILED:
                _notify(ctx, job_id, FAILED)
            return {"job_id": job_id, "skipped": claim}
        log.info("job started", extra={"attempt": claim.job["attempts"]})
        interval = max(0.2, min(1.0, ctx.settings.lease_seconds / 4))
        beat = _Heartbeat(ctx.jobs, job_id, claim.token, interval)
        beat.start()
        prefix = f"jobs/{job_id}/{claim.token}/"
        try:
            with disk_full_is_transient("the job's writes"):
                artifacts, result_key, timings = _execute(ctx, claim, beat)
        except JobStopped:
            _discard_attempt(ctx.store, prefix)
            log.info("job stopped: canceled or taken over")
            return {"job_id": job_id, "skipped": "stopped"}
        except SoftTimeLimitExceeded:
            _discard_attempt(ctx.store, prefix)
            error = JobTimeoutError(
                f"the job ran past the {ctx.settings.soft_time_limit} s time limit",
                details={"soft_time_limit": ctx.settings.soft_time_limit},
            )
            if ctx.jobs.fail(job_id, claim.token, error.to_dict()):
                _notify(ctx, job_id, FAILED)
            return {"job_id": job_id, "status": FAILED}
        except HeadforgeError as error:
            _discard_attempt(ctx.store, prefix)
            if error.transient and claim.job["attempts"] < ctx.settings.max_attempts:
                delay = TRANSIENT_RETRY_BASE_SECONDS ** claim.job["attempts"]
                if ctx.jobs.release(job_id, claim.token, delay=delay):
                    log.warning("transient error, retrying in %.0f s: %s", delay, error.message)
                    dispatch(app, ctx.jobs, job_id, claim.job["queue"], countdown=delay)
                return {"job_id": job_id, "status": "retrying"}
            log.info("job failed: [%s] %s", error.code, error.message)
            if ctx.jobs.fail(job_id, claim.token, error.to_dict()):
                _notify(ctx, job_id, FAILED)
            return {"job_id": job_id, "status": FAILED}
        except Exception as error:
            _discard_attempt(ctx.store, prefix)
            log.exception("job crashed")
            failure = HeadforgeError(f"internal error: {type(error).__name__}: {error}")
            if ctx.jobs.fail(job_id, claim.token, failure.to_dict()):
                _notify(ctx, job_id, FAILED)
            return {"job_id": job_id, "status": FAILED}
        finally:
            beat.done.set()
            beat.join(timeout=5)

        if ctx.jobs.complete(
            job_id,
            claim.token,
            artifacts=artifacts,
            result_key=result_key,
            timings_ms=timings,
            progress=beat.progress,
        ):
            try:
                record_stage_timings(ctx.jobs.backend, timings)
            except HeadforgeError:
                log.warning("stage metrics not recorded")
            log.info("job succeeded", extra={"timings_ms": timings})
            _notify(ctx, job_id, SUCCEEDED)
            try:
                _remove_other_attempts(ctx.store, job_id, prefix)
            except Exception as error:  # the job is done; leftovers go with the job at its TTL
                log.warning("could not remove earlier attempts' files: %s", error)
            return {"job_id": job_id, "status": SUCCEEDED, "artifact_keys": [a["key"] for a in artifacts]}
        # Canceled, deleted or taken over meanwhile: this attempt's files are not the job's.
        _discard_attempt(ctx.store, prefix)
        log.info("completion refused: the job is no longer held by this attempt")
        return {"job_id": job_id, "skipped": "lost"}


def _discard_attempt(store: ArtifactStore, prefix: str) -> None:
    """Delete a failed or stopped attempt's files, best effort: with the store down this must not
    hide the job's own error (a later attempt's `_remove_other_attempts` or the TTL sweep removes them)."""
    try:
        store.delete_prefix(prefix)
    except Exception as error:
        log.warning("could not delete the attempt's files under %s: %s", prefix, error)


def _remove_other_attempts(store: ArtifactStore, job_id: str, keep_prefix: str) -> None:
    """Delete files an earlier attempt (killed mid-upload) left beside the winning attempt's."""
    for key in store.list(f"jobs/{job_id}/"):
        if not key.startswith(keep_prefix):
            attempt = "/".join(key.split("/")[:3])
            store.delete_prefix(attempt)


# --------------------------------------------------------------------------- webhooks


def _notify(ctx: _ProcessContext, job_id: str, status: str) -> None:
    doc = ctx.jobs.get(job_id)
    if doc is None or not doc.get("webhook_url"):
        return
    publish_webhook(app, job_id, f"job.{status}", 1, doc["queue"])


@app.task(name=WEBHOOK_TASK, bind=True, acks_late=True)
def deliver_webhook(self: Any, job_id: str, event: str, attempt: int) -> dict[str, Any]:
    """POST the signed job document; on failure publish the next attempt with backoff."""
    from headforge.observability import job_context

    ctx = context()
    with job_context(job_id):
        doc = ctx.jobs.get(job_id)
        if doc is None or not doc.get("webhook_url"):
            return {"job_id": job_id, "skipped": "no webhook"}
        if not ctx.jobs.start_webhook_attempt(
            job_id, event, attempt, time.time() + WEBHOOK_IN_FLIGHT_SECONDS
        ):
            return {"job_id": job_id, "skipped": "already attempted"}  # a republished copy of this attempt
        body = webhooks.build_body(
            event, public_job(doc, base_url=os.environ.get("HEADFORGE_PUBLIC_URL", ""))
        )
        error_text = None
        status_code = None
        try:
            webhooks.check_webhook_url(doc["webhook_url"], ctx.settings.webhook_allow_private)
            status_code = webhooks.post(
                doc["webhook_url"],
                body,
                event=event,
                delivery_id=f"{job_id}.{event}",
                secret=ctx.settings.webhook_secret,
                timestamp=int(time.time()),
            )
        except WebhookHostUnresolvedError as error:  # a DNS failure can pass: retried like a failed POST
            error_text = error.message
        except HeadforgeError as error:  # refused at delivery time (DNS now points somewhere private)
            ctx.jobs.set_webhook_state(
                job_id,
                {
                    "event": event,
                    "attempts": attempt,
                    "delivered": False,
                    "last_error": error.message,
                    "due_at": None,
                },
            )
            return {"job_id": job_id, "delivered": False}
        except Exception as error:
            error_text = f"{type(error).__name__}: {error}"
        delivered = status_code is not None and 200 <= status_code < 300
        retry = not delivered and attempt < ctx.settings.webhook_max_attempts
        state = {
            "event": event,
            "attempts": attempt,
            "delivered": delivered,
            "last_status": status_code,
            "last_error": error_text,
            "due_at": time.time() + 2.0**attempt if retry else None,
        }
        ctx.jobs.set_webhook_state(job_id, state)
        if retry:
            publish_webhook(app, job_id, event, attempt + 1, doc["queue"], countdown=2.0**attempt)
        return {"job_id": job_id, "delivered": delivered}


# --------------------------------------------------------------------------- sweeper


def sweep(ctx: _ProcessContext, worker_name: str) -> dict[str, int]:
    """Requeue jobs whose worker died, publish jobs and webhooks whose message went missing, expire old jobs."""
    from headforge.service.jobs import RUNNING

    counts = {"requeued": 0, "redispatched": 0, "webhooks": 0, "expired": 0}
    now = time.time()
    ctx.jobs.worker_seen(worker_name)
    host = webhooks_host()
    for job_id in ctx.jobs.backend.members("leases", limit=1000):
        doc = ctx.jobs.get(job_id)
        if doc is None or doc["status"] != RUNNING or not doc.get("lease"):
            continue
        lease = doc["lease"]
        dead_here = lease.get("host") == host and not _alive(int(lease.get("pid", 0)))
        if lease["expires_at"] > now and not dead_here:
            continue
        if ctx.jobs.release(job_id, None, force=dead_here):
            log.warning(
                "requeued job %s: its worker stopped renewing the lease", job_id, extra={"job_id": job_id}
            )
            dispatch(app, ctx.jobs, job_id, doc["queue"])
            counts["requeued"] += 1
    for job_id in ctx.jobs.due_for_dispatch(now):
        doc = ctx.jobs.get(job_id)
        if doc is None or doc["status"] in TERMINAL or doc["status"] == RUNNING:
            continue
        dispatch(app, ctx.jobs, job_id, doc["queue"])
        counts["redispatched"] += 1
    overdue = now - ctx.settings.webhook_republish_after
    for job_id in ctx.jobs.webhooks_due(overdue):
        taken = ctx.jobs.take_due_webhook(job_id, now, overdue)
        if taken is None:
            continue
        event, attempt, queue = taken
        log.warning(
            "publishing webhook %s attempt %d again: it was due and never ran",
            event,
            attempt,
            extra={"job_id": job_id},
        )
        publish_webhook(app, job_id, event, attempt, queue)
        counts["webhooks"] += 1
    cutoff = now - ctx.settings.job_ttl_seconds
    for job_id in ctx.jobs.finished_before(cutoff):
        try:
            remove_job(ctx.jobs, ctx.store, job_id)
        except Exception as error:  # the record stays, so the next sweep tries again
            log.warning("could not remove expired job %s: %s", job_id, error, extra={"job_id": job_id})
            continue
        counts["expired"] += 1
    for batch_id in ctx.jobs.batches_before(cutoff):
        ctx.jobs.delete_batch(batch_id)
    return counts


def remove_job(jobs: JobStore, store: ArtifactStore, job_id: str) -> None:
    """Delete a job's uploads and artifacts, then its record. When the files cannot be removed the
    error propagates and the record stays, so a retry (or the sweeper, at the TTL) finds them."""
    store.delete_prefix(f"jobs/{job_id}")
    store.delete_prefix(f"inputs/{job_id}")
    jobs.delete(job_id)


def webhooks_host() -> str:
    import socket

    return socket.gethostname()


def _alive(pid: int) -> bool:
    from headforge.service.jobs import _pid_alive

    return pid > 0 and _pid_alive(pid)


class Sweeper(bootsteps.StartStopStep):
    """Runs `sweep` in the worker's parent process every `HEADFORGE_SWEEP_INTERVAL` seconds."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None

    def start(self, worker: Any) -> None:
        self.name_ = worker.hostname
        # Its own stores with a short retry: the sweeper runs in the consumer's event loop.
        self.ctx = _ProcessContext(retry_seconds=2.0)

        def tick() -> None:
            try:
                counts = sweep(self.ctx, self.name_)
                if any(counts.values()):
                    log.info("sweep", extra=counts)
            except Exception as error:  # never let the sweeper kill the worker
                log.warning("sweep failed: %s", error)

        tick()
        self.timer_ref = worker.timer.call_repeatedly(self.ctx.settings.sweep_interval, tick, priority=10)

    def stop(self, worker: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
        with contextlib.suppress(Exception):
            self.ctx.jobs.worker_gone(worker.hostname)


app.steps["worker"].add(Sweeper)
