"""Faults: kill -9 a worker mid-job; restart the API (jobs queued, and one running) and Redis (AOF), with
/readyz reporting the outage. Each test has its own stack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from stacklib import (
    Stack,
    WebhookReceiver,
    astronaut_jpeg,
    running_stack,
    wait_until,
)

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(600)]

# A job slow enough to catch while it runs: four 640 px photos at a large texture size.
SLOW_JOB = {"texture_size": 2048, "splats": 20000}


@pytest.fixture()
def fault_stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path / "stack", redis=True) as stack:
        yield stack


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


def _stored_files(stack: Stack, job_id: str) -> list[Path]:
    root = stack.root / "data" / "artifacts" / "jobs" / job_id
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_kill9_worker_mid_job_completes_exactly_once(
    fault_stack: Stack, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    stack = fault_stack
    first = stack.start_worker()
    stack.wait_for_workers(1)
    images = [(f"p{i}.jpg", astronaut_jpeg(640 - 16 * i)) for i in range(4)]
    with stack.client() as client:
        job_id = client.submit(images, webhook_url=receiver.url, **SLOW_JOB)["id"]
        wait_until(lambda: client.job(job_id)["status"] == "running", 120, "the job to start", 0.02)
        first.kill9()
        killed = client.job(job_id)
        assert killed["status"] == "running" and killed["attempts"] == 1  # it died mid-job

        stack.start_worker()
        job = client.wait(job_id, timeout=300, poll=0.2)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        saved = client.download_artifacts(job, tmp_path / "out")  # sizes and sha256 intact
        assert len(saved) == len(job["artifacts"]) and any(p.name == "result.json" for p in saved)
        result = json.loads((tmp_path / "out" / "result.json").read_text())
        assert len(result["images"]) == 4

    # Exactly one attempt's files are stored, and they are the recorded ones.
    stored = _stored_files(stack, job_id)
    assert len(stored) == len(job["artifacts"])
    assert (
        len({p.relative_to(stack.root / "data" / "artifacts" / "jobs" / job_id).parts[0] for p in stored})
        == 1
    )
    wait_until(lambda: receiver.for_job(job_id), 30, "the webhook")
    assert len(receiver.for_job(job_id)) == 1  # one completion, one notification


def _statuses(stack: Stack, ids: list[str]) -> dict[str, str] | None:
    """Every job's status, or None while the API answers 503 (Redis reloading)."""
    with stack.client() as client:
        try:
            return {i: client.job(i)["status"] for i in ids}
        except Exception:
            return None


def _positions(stack: Stack, ids: list[str]) -> list[int | None] | None:
    """Every job's queue position, in the order of `ids`, or None while the API answers 503."""
    with stack.client() as client:
        try:
            return [client.job(i)["queue_position"] for i in ids]
        except Exception:
            return None


def test_restart_api_and_redis_loses_nothing(fault_stack: Stack, receiver: WebhookReceiver) -> None:
    stack = fault_stack
    # Phase 1, no worker yet: every accepted job is certainly still queued through both restarts.
    # The first job is slow, so that phase 2 can restart the API while it certainly runs.
    with stack.client() as client:
        slow = client.submit(
            [(f"s{i}.jpg", astronaut_jpeg(640 - 16 * i)) for i in range(4)],
            webhook_url=receiver.url,
            **SLOW_JOB,
        )["id"]
        ids = [slow] + [
            client.submit(
                [(f"{i}.jpg", astronaut_jpeg(400 + 16 * i))],
                webhook_url=receiver.url,
                texture_size=1024,
                splats=5000,
            )["id"]
            for i in range(4)
        ]
    assert _positions(stack, ids) == list(range(len(ids)))  # submission order, nothing ahead of them
    stack.stop_api()
    stack.start_api()
    with stack.client() as client:
        ids.append(
            client.submit(
                [("late.jpg", astronaut_jpeg(360))], webhook_url=receiver.url, texture_size=1024, splats=5000
            )["id"]
        )
    assert set(wait_until(lambda: _statuses(stack, ids), 60, "the API").values()) == {"queued"}
    assert _positions(stack, ids) == list(range(len(ids)))

    stack.stop_redis()
    # Not ready, in the one error shape, naming what is down; the artifact store on disk is fine.
    ready = httpx.get(f"{stack.base_url}/readyz", timeout=60)
    assert ready.status_code == 503
    body = ready.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    error = body["error"]
    assert error["code"] == "service_unavailable"
    assert {"state", "broker"} <= set(error["details"]["failed"]), error
    assert "store" not in error["details"]["failed"] and error["details"]["ok"]["store"] == "ok"
    assert "state" in error["message"] and "broker" in error["message"]
    assert int(ready.headers["retry-after"]) >= 1
    stack.start_redis()
    assert set(wait_until(lambda: _statuses(stack, ids), 60, "the API after Redis").values()) == {"queued"}
    assert _positions(stack, ids) == list(range(len(ids)))  # the AOF kept the queue and its order
    assert httpx.get(f"{stack.base_url}/readyz", timeout=60).status_code == 200

    # Phase 2: a worker drains the queue. The API restarts while the slow job runs, then Redis
    # restarts while some job runs.
    stack.start_worker()
    stack.wait_for_workers(1)
    wait_until(
        lambda: (_statuses(stack, [slow]) or {}).get(slow) == "running", 120, "the slow job to start", 0.02
    )
    stack.stop_api()
    stack.start_api()
    wait_until(lambda: "running" in (_statuses(stack, ids) or {}).values(), 120, "a job to run", 0.05)
    stack.stop_redis()
    stack.start_redis()

    def all_finished() -> bool:
        statuses = _statuses(stack, ids)
        return statuses is not None and set(statuses.values()) <= {"succeeded", "failed", "canceled"}

    wait_until(all_finished, 400, "every accepted job to finish", 0.5)
    with stack.client() as client:
        jobs = [client.job(i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), [j["error"] for j in jobs]
    for job in jobs:  # exactly one attempt's files are stored, and they are the recorded ones
        stored = _stored_files(stack, job["id"])
        assert len(stored) == len(job["artifacts"])
        assert (
            len(
                {
                    p.relative_to(stack.root / "data" / "artifacts" / "jobs" / job["id"]).parts[0]
                    for p in stored
                }
            )
            == 1
        )
    assert len(jobs[0]["result"]["images"]) == 4  # the slow job, restarted around, complete
    wait_until(lambda: all(receiver.for_job(i) for i in ids), 60, "every webhook")
    assert all(len(receiver.for_job(i)) == 1 for i in ids)


def test_a_webhook_whose_publish_was_lost_is_sent_by_the_sweeper(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """A worker that dies between finishing a job and publishing its webhook leaves the notification
    recorded as due with the job; the sweeper publishes it, and it is delivered once."""
    from headforge.service.jobs import Claim, JobStore, make_backend
    from headforge.service.settings import Settings

    with running_stack(
        tmp_path / "stack", redis=True, worker_concurrency=1, HEADFORGE_WEBHOOK_REPUBLISH_AFTER="1"
    ) as stack:
        settings = Settings(data_dir=tmp_path / "unused", redis_url=stack.env["HEADFORGE_REDIS_URL"])
        jobs = JobStore(make_backend(settings), settings)
        job_id = "job_lostwebhook0123456789ab"
        jobs.create_job(
            job_id=job_id,
            owner="alice",
            options={"pipeline": "facemesh"},
            inputs=[],
            queue="cpu",
            webhook_url=receiver.url,
        )
        claim = jobs.claim(job_id, {"host": "a-host-that-died", "pid": 1})
        assert isinstance(claim, Claim)
        # What the dead worker managed: the job is complete; nobody published its webhook.
        assert jobs.complete(job_id, claim.token, artifacts=[], result_key=None, timings_ms={})
        assert job_id in jobs.webhooks_due(float("inf"))

        wait_until(lambda: (jobs.get(job_id) or {}).get("webhook", {}).get("delivered"), 60, "the webhook")
        deliveries = receiver.for_job(job_id)
        assert len(deliveries) == 1 and json.loads(deliveries[0]["body"])["event"] == "job.succeeded"
        assert job_id not in jobs.webhooks_due(float("inf"))  # nothing left for a later sweep to send
        assert "publishing webhook job.succeeded attempt 1 again" in stack.workers[0].log_path.read_text()
