"""Job and batch records and every state transition, written once over a `StateBackend`.

A job is a JSON document keyed by its id. Status moves

    queued → running → succeeded | failed          (and queued/running → canceled)
    running → queued                               (lease expired or transient error: retried)

Each transition is a compare-and-set inside `StateBackend.mutate`: a worker claims a job with a
fresh lease token, renews the lease while it works, and can only complete or fail the job while it
still holds that token. A second delivery of the same message finds the job running under a live
lease, or already finished, and does nothing; so a job completes exactly once however often the
broker delivers it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from headforge.errors import (
    IdempotencyConflictError,
    NotFoundError,
    TooManyQueuedError,
    WorkerLostError,
)
from headforge.service.settings import QUEUES, Settings
from headforge.service.state import UNCHANGED, Document, RedisState, SqliteState, StateBackend

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
UNDISPATCHED_GRACE = 15.0  # seconds before the sweeper publishes a job the gateway failed to publish
IDEMPOTENCY_TTL = 24 * 3600.0


def new_id(prefix: str) -> str:
    """A sortable-enough, unguessable id: `job_` + 24 hex characters."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def indexes(kind: str, doc: Document) -> dict[str, float]:
    """The sorted-set memberships a document implies; the backend keeps them in step."""
    if kind == "job":
        entries = {f"status:{doc['status']}": doc["updated_at"], f"owner:{doc['owner']}": doc["created_at"]}
        if doc["status"] == QUEUED:
            entries[f"queue:{doc['queue']}"] = doc["enqueued_at"]
            entries["dispatch"] = doc["redispatch_due"]
        if doc["status"] == RUNNING and doc.get("lease"):
            entries["leases"] = doc["lease"]["expires_at"]
        if doc["status"] in (QUEUED, RUNNING):
            entries[f"active:{doc['owner']}"] = doc["created_at"]
        if doc["status"] in TERMINAL:
            entries["finished"] = doc["finished_at"]
            pending = (doc.get("webhook") or {}).get("due_at")
            if pending is not None:
                entries["webhooks"] = pending
        return entries
    if kind == "batch":
        return {f"batches:{doc['owner']}": doc["created_at"], "batches": doc["created_at"]}
    return {}


def make_backend(settings: Settings, retry_seconds: float = 3.0) -> StateBackend:
    """Redis when `HEADFORGE_REDIS_URL` is set, else the embedded SQLite file."""
    if settings.redis_url:
        return RedisState(settings.redis_url, indexer=indexes, retry_seconds=retry_seconds)
    return SqliteState(settings.state_path, indexer=indexes)


@dataclass
class Claim:
    """A successful claim: the job as now stored and the lease token that owns it."""

    job: Document
    token: str


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _at(now: float | None) -> float:
    """`now` when the caller fixed the time of a transition, else the clock."""
    return time.time() if now is None else now


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


class JobStore:
    """Jobs, batches, idempotency keys and per-key quotas on top of a `StateBackend`."""

    def __init__(self, backend: StateBackend, settings: Settings):
        self.backend = backend
        self.settings = settings

    # ------------------------------------------------------------------ creation and reads

    def create_job(
        self,
        *,
        job_id: str,
        owner: str,
        options: dict[str, Any],
        inputs: list[dict[str, Any]],
        queue: str,
        webhook_url: str | None = None,
        batch_id: str | None = None,
        label: str | None = None,
    ) -> Document:
        now = time.time()
        doc: Document = {
            "id": job_id,
            "owner": owner,
            "status": QUEUED,
            "created_at": now,
            "updated_at": now,
            "enqueued_at": now,
            "started_at": None,
            "finished_at": None,
            "options": options,
            "inputs": inputs,
            "queue": queue,
            "batch_id": batch_id,
            "label": label,
            "webhook_url": webhook_url,
            "webhook": None,
            "attempts": 0,
            "requeues": 0,
            "lease": None,
            "dispatched_at": None,
            "redispatch_due": now + UNDISPATCHED_GRACE,
            "progress": {},
            "timings_ms": {},
            "error": None,
            "artifacts": [],
            "result_key": None,
        }

        def insert(current: Document | None) -> Document:
            if current is not None:
                raise RuntimeError(f"job id collision: {job_id}")
            return doc

        self.backend.mutate("job", job_id, insert)
        return doc

    def get(self, job_id: str) -> Document | None:
        return self.backend.get("job", job_id)

    def get_for(self, owner: str, job_id: str) -> Document:
        """The job, if `owner` may see it; otherwise `NotFoundError` (never 403: ids don't leak)."""
        doc = self.backend.get("job", job_id)
        if doc is None or doc["owner"] != owner:
            raise NotFoundError("no such job", details={"job_id": job_id})
        return doc

    def get_many(self, job_ids: list[str]) -> list[Document | None]:
        return self.backend.get_many("job", job_ids)

    def list_for(self, owner: str, limit: int = 50) -> list[Document]:
        ids = self.backend.members(f"owner:{owner}", limit=limit, descending=True)
        return [d for d in self.backend.get_many("job", ids) if d is not None]

    def queue_position(self, doc: Document) -> int | None:
        if doc["status"] != QUEUED:
            return None
        return self.backend.rank(f"queue:{doc['queue']}", doc["id"])

    def active_count(self, owner: str) -> int:
        return self.backend.count(f"active:{owner}")

    def check_quota(self, owner: str, new_jobs: int, max_queued: int) -> None:
        active = self.active_count(owner)
        if active + new_jobs > max_queued:
            raise TooManyQueuedError(
                f"this key already has {active} unfinished jobs (limit {max_queued})",
                details={"active": active, "limit": max_queued, "requested": new_jobs, "retry_after": 5},
            )

    # ------------------------------------------------------------------ idempotency

    def reserve_idempotency(self, owner: str, key: str, fingerprint: str, resource_id: str) -> str | None:
        """Reserve `key` for this request; return the earlier resource id when the same request
        was seen before, raise `IdempotencyConflictError` when the key was used for another body."""
        value = json.dumps({"fingerprint": fingerprint, "id": resource_id})
        existing = self.backend.set_if_absent(f"idem:{owner}:{key}", value, IDEMPOTENCY_TTL)
        if existing is None:
            return None
        previous = json.loads(existing)
        if previous["fingerprint"] != fingerprint:
            raise IdempotencyConflictError(
                "this Idempotency-Key was already used with a different request",
                details={"idempotency_key": key},
            )
        return str(previous["id"])

    def release_idempotency(self, owner: str, key: str) -> None:
        self.backend.delete_value(f"idem:{owner}:{key}")

    # ------------------------------------------------------------------ transitions

    def mark_dispatched(self, job_id: str) -> None:
        def apply(doc: Document | None) -> Any:
            if doc is None or doc["status"] != QUEUED:
                return UNCHANGED
            now = time.time()
            doc["dispatched_at"] = now
            doc["redispatch_due"] = now + self.settings.effective_redispatch_after
            return doc

        self.backend.mutate("job", job_id, apply)

    def claim(
        self, job_id: str, identity: dict[str, Any] | None = None, *, now: float | None = None
    ) -> Claim | str:
        """Take the job for this worker. Returns a `Claim`, or a reason string when another
        holder owns it or it is finished, canceled or gone (the caller then does nothing).
        `now` (default: the clock) is the time the lease is judged and stamped at."""
        identity = identity or worker_identity()
        token = uuid.uuid4().hex
        outcome: dict[str, str] = {}

        def apply(doc: Document | None) -> Any:
            moment = _at(now)
            if doc is None:
                outcome["reason"] = "missing"
                return UNCHANGED
            if doc["status"] in TERMINAL:
                outcome["reason"] = doc["status"]
                return UNCHANGED
            if doc["status"] == RUNNING:
                lease = doc.get("lease") or {}
                same_host_dead = lease.get("host") == identity["host"] and not _pid_alive(
                    int(lease.get("pid", 0))
                )
                if lease.get("expires_at", 0) > moment and not same_host_dead:
                    outcome["reason"] = "busy"
                    return UNCHANGED
            if doc["attempts"] >= self.settings.max_attempts:
                error = WorkerLostError(
                    f"the job was started {doc['attempts']} times and its worker was lost each time",
                    details={"attempts": doc["attempts"]},
                )
                self._finish(doc, FAILED, moment, error=error.to_dict())
                outcome["reason"] = "failed"
                return doc
            if doc["started_at"] is None:
                doc["started_at"] = moment
                doc["timings_ms"]["queue_wait"] = round((moment - doc["enqueued_at"]) * 1000, 2)
            doc["status"] = RUNNING
            doc["attempts"] += 1
            doc["lease"] = {**identity, "token": token, "expires_at": moment + self.settings.lease_seconds}
            doc["updated_at"] = moment
            return doc

        _old, new = self.backend.mutate("job", job_id, apply)
        if outcome.get("reason") == FAILED:
            self.backend.incr("jobs_finished", {FAILED: 1})
            self.backend.notify(f"done:{job_id}")
        if "reason" in outcome or new is None:
            return outcome.get("reason", "missing")
        return Claim(job=new, token=token)

    def _holds(self, doc: Document | None, token: str) -> bool:
        return doc is not None and doc["status"] == RUNNING and (doc.get("lease") or {}).get("token") == token

    def heartbeat(
        self, job_id: str, token: str, progress: dict[str, float] | None = None, *, now: float | None = None
    ) -> bool:
        """Renew the lease (and record progress). False when the job was canceled, deleted or
        taken over: the caller should stop."""
        held = {"ok": False}

        def apply(doc: Document | None) -> Any:
            if not self._holds(doc, token):
                return UNCHANGED
            assert doc is not None
            held["ok"] = True
            moment = _at(now)
            doc["lease"]["expires_at"] = moment + self.settings.lease_seconds
            if progress:
                doc["progress"].update(progress)
            doc["updated_at"] = moment
            return doc

        self.backend.mutate("job", job_id, apply)
        return held["ok"]

    def _finish(self, doc: Document, status: str, now: float, *, error: dict[str, Any] | None = None) -> None:
        doc["status"] = status
        doc["lease"] = None
        doc["finished_at"] = now
        doc["updated_at"] = now
        doc["error"] = error
        if doc["started_at"] is not None and status != CANCELED:
            doc["timings_ms"]["total"] = round((now - doc["enqueued_at"]) * 1000, 2)
        if doc.get("webhook_url"):
            # Recorded with the transition itself: if the process that made it dies (or fails to
            # publish) before the notification is published, the sweeper finds it here and publishes it.
            doc["webhook"] = {"event": f"job.{status}", "attempts": 0, "delivered": False, "due_at": now}

    def complete(
        self,
        job_id: str,
        token: str,
        *,
        artifacts: list[dict[str, Any]],
        result_key: str | None,
        timings_ms: dict[str, float],
        progress: dict[str, float] | None = None,
        now: float | None = None,
    ) -> bool:
        """running → succeeded, only for the lease holder. Returns whether this call won."""
        won = {"ok": False}

        def apply(doc: Document | None) -> Any:
            if not self._holds(doc, token):
                return UNCHANGED
            assert doc is not None
            won["ok"] = True
            doc["artifacts"] = artifacts
            doc["result_key"] = result_key
            doc["timings_ms"].update(timings_ms)
            doc["progress"] = {stage: 1.0 for stage in {**doc["progress"], **(progress or {})}}
            self._finish(doc, SUCCEEDED, _at(now))
            return doc

        self.backend.mutate("job", job_id, apply)
        if won["ok"]:
            self.backend.incr("jobs_finished", {SUCCEEDED: 1})
            self.backend.notify(f"done:{job_id}")
        return won["ok"]

    def fail(
        self, job_id: str, token: str | None, error: dict[str, Any], *, now: float | None = None
    ) -> bool:
        """running → failed (lease holder only; `token=None` fails a queued or running job)."""
        won = {"ok": False}

        def apply(doc: Document | None) -> Any:
            if doc is None or doc["status"] in TERMINAL:
                return UNCHANGED
            if token is not None and not self._holds(doc, token):
                return UNCHANGED
            won["ok"] = True
            self._finish(doc, FAILED, _at(now), error=error)
            return doc

        self.backend.mutate("job", job_id, apply)
        if won["ok"]:
            self.backend.incr("jobs_finished", {FAILED: 1})
            self.backend.notify(f"done:{job_id}")
        return won["ok"]

    def release(
        self,
        job_id: str,
        token: str | None,
        delay: float = 0.0,
        force: bool = False,
        *,
        now: float | None = None,
    ) -> bool:
        """running → queued for another attempt (expired lease, or a transient error). With a token,
        only its holder may release; without one, only when the lease has expired at `now` (default:
        the clock), or with `force`, when the caller saw that the holder's process is gone."""
        released = {"ok": False}

        def apply(doc: Document | None) -> Any:
            if doc is None or doc["status"] != RUNNING:
                return UNCHANGED
            moment = _at(now)
            lease = doc.get("lease") or {}
            if token is not None and lease.get("token") != token:
                return UNCHANGED
            if token is None and not force and lease.get("expires_at", 0) > moment:
                return UNCHANGED
            released["ok"] = True
            doc["status"] = QUEUED
            doc["lease"] = None
            doc["requeues"] += 1
            doc["enqueued_at"] = moment
            doc["dispatched_at"] = moment
            doc["redispatch_due"] = moment + delay + self.settings.effective_redispatch_after
            doc["updated_at"] = moment
            return doc

        self.backend.mutate("job", job_id, apply)
        return released["ok"]

    def cancel(self, job_id: str) -> Document | None:
        """queued/running → canceled. A running worker notices at its next heartbeat."""

        def apply(doc: Document | None) -> Any:
            if doc is None or doc["status"] in TERMINAL:
                return UNCHANGED
            self._finish(doc, CANCELED, time.time())
            return doc

        old, new = self.backend.mutate("job", job_id, apply)
        if new is not None and old is not None and old["status"] != new["status"]:
            self.backend.incr("jobs_finished", {CANCELED: 1})
            self.backend.notify(f"done:{job_id}")
        return new

    def delete(self, job_id: str) -> Document | None:
        """Remove the record (the caller removes its inputs and artifacts)."""
        old, _new = self.backend.mutate("job", job_id, lambda doc: None if doc is not None else UNCHANGED)
        return old

    def webhooks_due(self, before: float, limit: int = 100) -> list[str]:
        """Finished jobs whose next webhook attempt was due before `before` and has not run."""
        return self.backend.members("webhooks", max_score=before, limit=limit)

    def take_due_webhook(self, job_id: str, now: float, before: float) -> tuple[str, int, str] | None:
        """(event, attempt, queue) of a webhook attempt that was due before `before` and has not run,
        moved to `now` so the next sweep leaves it alone; None when it ran or was taken meanwhile."""
        taken: dict[str, Any] = {}

        def apply(doc: Document | None) -> Any:
            state = (doc or {}).get("webhook") or {}
            if doc is None or state.get("due_at") is None or state["due_at"] > before:
                return UNCHANGED
            taken.update(event=state["event"], attempt=int(state["attempts"]) + 1, queue=doc["queue"])
            doc["webhook"] = {**state, "due_at": now}
            return doc

        self.backend.mutate("job", job_id, apply)
        return (taken["event"], taken["attempt"], taken["queue"]) if taken else None

    def start_webhook_attempt(self, job_id: str, event: str, attempt: int, due_again_at: float) -> bool:
        """Claim attempt `attempt` of `event`'s delivery; False when it (or a later one) was already made,
        or the event was delivered. The claim stays due at `due_again_at`, so if this worker dies
        mid-delivery the sweeper publishes the next attempt; two copies of one attempt send it once."""
        won = {"ok": False}

        def apply(doc: Document | None) -> Any:
            if doc is None:
                return UNCHANGED
            state = doc.get("webhook") or {}
            if state.get("event") == event and (
                state.get("delivered") or int(state.get("attempts", 0)) >= attempt
            ):
                return UNCHANGED
            doc["webhook"] = {
                **state,
                "event": event,
                "attempts": attempt,
                "delivered": False,
                "due_at": due_again_at,
            }
            won["ok"] = True
            return doc

        self.backend.mutate("job", job_id, apply)
        return won["ok"]

    def set_webhook_state(self, job_id: str, state: dict[str, Any]) -> None:
        def apply(doc: Document | None) -> Any:
            if doc is None:
                return UNCHANGED
            doc["webhook"] = state
            return doc

        self.backend.mutate("job", job_id, apply)

    # ------------------------------------------------------------------ sweeper queries

    def expired_leases(self, now: float, limit: int = 100) -> list[str]:
        return self.backend.members("leases", max_score=now, limit=limit)

    def due_for_dispatch(self, now: float, limit: int = 100) -> list[str]:
        return self.backend.members("dispatch", max_score=now, limit=limit)

    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        return self.backend.members("finished", max_score=cutoff, limit=limit)

    def count_status(self, status: str) -> int:
        return self.backend.count(f"status:{status}")

    def queue_depth(self, queue: str) -> int:
        return self.backend.count(f"queue:{queue}")

    # ------------------------------------------------------------------ batches

    def create_batch(self, *, batch_id: str, owner: str, job_ids: list[str], names: list[str]) -> Document:
        doc: Document = {
            "id": batch_id,
            "owner": owner,
            "created_at": time.time(),
            "job_ids": job_ids,
            "names": names,
        }
        self.backend.mutate("batch", batch_id, lambda _current: doc)
        return doc

    def get_batch_for(self, owner: str, batch_id: str) -> Document:
        doc = self.backend.get("batch", batch_id)
        if doc is None or doc["owner"] != owner:
            raise NotFoundError("no such batch", details={"batch_id": batch_id})
        return doc

    def delete_batch(self, batch_id: str) -> None:
        self.backend.mutate("batch", batch_id, lambda doc: None if doc is not None else UNCHANGED)

    def batches_before(self, cutoff: float, limit: int = 100, scan: int = 1000) -> list[str]:
        """Batches due for removal at `cutoff`: created before it, and every job of theirs finished
        before it or already removed. A batch with a queued or running job is kept however old.
        The oldest `scan` batches created before `cutoff` are examined."""
        candidates = self.backend.members("batches", max_score=cutoff, limit=scan)
        due: list[str] = []
        for batch_id, batch in zip(candidates, self.backend.get_many("batch", candidates), strict=True):
            if batch is None:
                continue
            members = self.backend.get_many("job", list(batch.get("job_ids", [])))
            if all(
                job is None or (job["status"] in TERMINAL and job["finished_at"] <= cutoff) for job in members
            ):
                due.append(batch_id)
                if len(due) >= limit:
                    break
        return due

    # ------------------------------------------------------------------ workers

    def worker_seen(
        self, name: str, queues: Sequence[str] | None = None, *, now: float | None = None
    ) -> None:
        """Record that worker `name` is alive, overall and under each queue it consumes (default: the
        `worker_queues` setting, which a worker process learns from Celery at startup)."""
        moment = _at(now)
        self.backend.index_add("workers", name, moment)
        for queue in self.settings.worker_queues if queues is None else queues:
            self.backend.index_add(f"workers:{queue}", name, moment)

    def worker_gone(self, name: str) -> None:
        self.backend.index_remove("workers", name)
        for queue in QUEUES:
            self.backend.index_remove(f"workers:{queue}", name)

    def live_workers(
        self, within: float = 60.0, queue: str | None = None, *, now: float | None = None
    ) -> int:
        """Workers seen in the last `within` seconds: all of them, or those consuming `queue`."""
        index = "workers" if queue is None else f"workers:{queue}"
        return self.backend.count(index, min_score=_at(now) - within)
