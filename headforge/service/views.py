"""The public JSON shape of jobs and batches (used by the API and by webhook bodies)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from headforge.service.jobs import QUEUED, STATUSES, TERMINAL, JobStore
from headforge.service.store import ArtifactStore


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def artifact_url(job_id: str, name: str, base_url: str = "") -> str:
    return f"{base_url}/v1/jobs/{job_id}/artifacts/{name}"


def public_job(
    doc: dict[str, Any],
    jobs: JobStore | None = None,
    store: ArtifactStore | None = None,
    *,
    include_result: bool = False,
    base_url: str = "",
) -> dict[str, Any]:
    """Everything a client may see about a job (no owner, lease or storage keys)."""
    public: dict[str, Any] = {
        "id": doc["id"],
        "status": doc["status"],
        "status_url": f"{base_url}/v1/jobs/{doc['id']}",
        "created_at": iso(doc["created_at"]),
        "updated_at": iso(doc["updated_at"]),
        "started_at": iso(doc["started_at"]),
        "finished_at": iso(doc["finished_at"]),
        "options": doc["options"],
        "inputs": [
            {k: item.get(k) for k in ("filename", "size", "sha256", "format", "width", "height")}
            for item in doc["inputs"]
        ],
        "batch_id": doc.get("batch_id"),
        "progress": doc["progress"],
        "queue_position": None,
        "attempts": doc["attempts"],
        "timings_ms": doc["timings_ms"],
        "error": doc["error"],
        "artifacts": [
            {
                "name": a["name"],
                "size": a["size"],
                "sha256": a["sha256"],
                "media_type": a["media_type"],
                "url": artifact_url(doc["id"], a["name"], base_url),
            }
            for a in doc["artifacts"]
        ],
        "result": None,
    }
    if doc["status"] == QUEUED and jobs is not None:
        public["queue_position"] = jobs.queue_position(doc)
    if include_result and doc["status"] == "succeeded" and doc.get("result_key") and store is not None:
        try:
            public["result"] = json.loads(store.get_bytes(doc["result_key"]))
        except Exception:  # the record outlived its artifacts (TTL race); report without it
            public["result"] = None
    return public


def public_batch(
    batch: dict[str, Any], job_docs: list[dict[str, Any] | None], base_url: str = ""
) -> dict[str, Any]:
    """A batch with counts per status and the mean progress of its jobs."""
    counts = dict.fromkeys(STATUSES, 0)
    fractions: list[float] = []
    jobs_out: list[dict[str, Any]] = []
    for job_id, name, doc in zip(batch["job_ids"], batch["names"], job_docs, strict=True):
        if doc is None:
            jobs_out.append({"id": job_id, "filename": name, "status": "deleted"})
            continue
        counts[doc["status"]] += 1
        if doc["status"] in TERMINAL:
            fractions.append(1.0)
        elif doc["progress"]:
            fractions.append(sum(doc["progress"].values()) / len(doc["progress"]))
        else:
            fractions.append(0.0)
        jobs_out.append(
            {
                "id": job_id,
                "filename": name,
                "status": doc["status"],
                "status_url": f"{base_url}/v1/jobs/{job_id}",
                "error": doc["error"],
            }
        )
    total = len(batch["job_ids"])
    finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
    return {
        "id": batch["id"],
        "status": "finished" if finished == total else "running",
        "created_at": iso(batch["created_at"]),
        "total": total,
        "counts": counts,
        "progress": round(sum(fractions) / total, 4) if total else 1.0,
        "jobs": jobs_out,
        "archive_url": f"{base_url}/v1/batches/{batch['id']}/archive",
    }
