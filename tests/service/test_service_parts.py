"""The service's parts on their own: job-store transitions on both backends (real Redis, real SQLite),
the token bucket, artifact stores (local and S3 via a moto server), API keys and webhook checks, the
Celery configuration and its messages, the sweeper's retention, and per-queue worker counts.

Leases here last `LONG_LEASE` seconds, so a lease a test relies on cannot lapse however slow the
machine is; a test that needs one expired says when, with the `now` argument of the transitions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stacklib import Process, free_port, moto_server, require_redis, wait_until

from headforge.errors import (
    IdempotencyConflictError,
    NotFoundError,
    TooManyQueuedError,
    UnauthorizedError,
    WebhookRefusedError,
)
from headforge.service.auth import Authenticator, hash_key, new_api_key
from headforge.service.jobs import Claim, JobStore, indexes
from headforge.service.settings import Settings
from headforge.service.state import RedisState, SqliteState, StateBackend
from headforge.service.store import LocalArtifactStore, S3ArtifactStore
from headforge.service.webhooks import check_webhook_url, sign, verify

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_redis()
    root = tmp_path_factory.mktemp("redis-unit")
    port = free_port()
    server = Process(
        "redis",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(root)],
        dict(os.environ),
        root,
    )
    import redis

    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(pings, 20, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateBackend]:
    if request.param == "sqlite":
        state: StateBackend = SqliteState(tmp_path / "state.sqlite", indexer=indexes)
    else:
        url = request.getfixturevalue("redis_url")
        state = RedisState(url, indexer=indexes, prefix=f"t{time.monotonic_ns()}")
    yield state
    state.close()


LONG_LEASE = 3600.0


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path, "lease_seconds": LONG_LEASE, "max_attempts": 3}
    values.update(overrides)
    return Settings(**values)


def _job(jobs: JobStore, job_id: str = "job_1", owner: str = "alice") -> dict[str, Any]:
    return jobs.create_job(
        job_id=job_id,
        owner=owner,
        options={"pipeline": "facemesh"},
        inputs=[{"key": "inputs/x", "filename": "x.jpg"}],
        queue="cpu",
    )


A = {"host": "host-a", "pid": os.getpid()}
B = {"host": "host-b", "pid": os.getpid()}


def test_only_one_claim_wins_and_only_the_holder_completes(backend: StateBackend, tmp_path: Path) -> None:
    jobs = JobStore(backend, _settings(tmp_path))
    _job(jobs)
    assert jobs.queue_position(jobs.get("job_1") or {}) == 0
    first = jobs.claim("job_1", A)
    assert isinstance(first, Claim) and first.job["status"] == "running" and first.job["attempts"] == 1
    assert jobs.claim("job_1", B) == "busy"  # a duplicate delivery while the lease is live
    assert not jobs.complete("job_1", "not-the-token", artifacts=[], result_key=None, timings_ms={})
    assert jobs.complete(
        "job_1", first.token, artifacts=[{"name": "a"}], result_key="k", timings_ms={"x": 1.0}
    )
    assert not jobs.complete("job_1", first.token, artifacts=[], result_key=None, timings_ms={})
    assert jobs.claim("job_1", B) == "succeeded"  # redelivery after success is a no-op
    done = jobs.get("job_1") or {}
    assert done["status"] == "succeeded" and done["artifacts"] == [{"name": "a"}]
    assert backend.counters("jobs_finished")["succeeded"] == 1
    assert jobs.count_status("succeeded") == 1 and jobs.count_status("running") == 0


def test_expired_lease_is_released_and_reclaimed(backend: StateBackend, tmp_path: Path) -> None:
    jobs = JobStore(backend, _settings(tmp_path))
    _job(jobs)
    start = time.time()
    first = jobs.claim("job_1", A, now=start)
    assert isinstance(first, Claim) and first.job["lease"]["expires_at"] == start + LONG_LEASE
    assert not jobs.release("job_1", None)  # lease still live
    renewed = start + LONG_LEASE / 2
    assert jobs.heartbeat("job_1", first.token, {"detect": 0.5}, now=renewed)
    old_expiry = start + LONG_LEASE + 1  # past the first lease, inside the renewed one
    assert jobs.expired_leases(old_expiry) == []
    assert not jobs.release("job_1", None, now=old_expiry)
    assert jobs.claim("job_1", B, now=old_expiry) == "busy"
    expired = renewed + LONG_LEASE + 1
    assert jobs.expired_leases(expired) == ["job_1"]
    assert jobs.release("job_1", None, now=expired)
    requeued = jobs.get("job_1") or {}
    assert requeued["status"] == "queued" and requeued["lease"] is None and requeued["requeues"] == 1
    assert requeued["progress"] == {"detect": 0.5}
    assert not jobs.heartbeat("job_1", first.token, now=expired)  # the old holder learns it lost the job
    second = jobs.claim("job_1", B, now=expired)
    assert isinstance(second, Claim) and second.job["attempts"] == 2
    assert not jobs.complete("job_1", first.token, artifacts=[], result_key=None, timings_ms={})
    assert jobs.complete("job_1", second.token, artifacts=[], result_key=None, timings_ms={})


def test_attempts_are_bounded(backend: StateBackend, tmp_path: Path) -> None:
    """With the real clock: a short lease, and the test waits for it to lapse (no fixed sleep)."""
    jobs = JobStore(backend, _settings(tmp_path, max_attempts=1, lease_seconds=0.2))
    _job(jobs)
    assert isinstance(jobs.claim("job_1", A), Claim)
    wait_until(lambda: jobs.release("job_1", None), 60, "the lease to lapse")
    assert jobs.claim("job_1", B) == "failed"
    failed = jobs.get("job_1") or {}
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert backend.counters("jobs_finished")["failed"] == 1


def test_transient_failure_requeues_the_job_with_a_delay(backend: StateBackend, tmp_path: Path) -> None:
    """The job-store half of `run_job`'s transient-error branch: the holder gives the job back with a
    delay, the sweeper may republish it only after that delay, and the next claim is attempt 2."""
    jobs = JobStore(backend, _settings(tmp_path, redispatch_after=100.0))
    _job(jobs)
    start = time.time()
    first = jobs.claim("job_1", A, now=start)
    assert isinstance(first, Claim)
    assert not jobs.release("job_1", "not-the-token", delay=4.0, now=start)
    assert jobs.release("job_1", first.token, delay=4.0, now=start)  # a live lease: only its holder may
    doc = jobs.get("job_1") or {}
    assert (
        doc["status"] == "queued" and doc["lease"] is None and doc["attempts"] == 1 and doc["requeues"] == 1
    )
    assert doc["redispatch_due"] == start + 4.0 + 100.0
    assert jobs.due_for_dispatch(start + 103.0) == [] and jobs.due_for_dispatch(start + 105.0) == ["job_1"]
    assert jobs.queue_position(doc) == 0
    assert not jobs.complete("job_1", first.token, artifacts=[], result_key=None, timings_ms={})
    second = jobs.claim("job_1", B, now=start + 4.0)
    assert isinstance(second, Claim) and second.job["attempts"] == 2


def test_cancel_stops_the_holder(backend: StateBackend, tmp_path: Path) -> None:
    jobs = JobStore(backend, _settings(tmp_path, lease_seconds=30))
    _job(jobs)
    claim = jobs.claim("job_1", A)
    assert isinstance(claim, Claim)
    assert (jobs.cancel("job_1") or {})["status"] == "canceled"
    assert not jobs.heartbeat("job_1", claim.token)
    assert not jobs.complete("job_1", claim.token, artifacts=[], result_key=None, timings_ms={})
    assert jobs.claim("job_1", B) == "canceled"


def test_ownership_quota_and_idempotency(backend: StateBackend, tmp_path: Path) -> None:
    jobs = JobStore(backend, _settings(tmp_path))
    _job(jobs, "job_a", "alice")
    _job(jobs, "job_b", "alice")
    with pytest.raises(NotFoundError):
        jobs.get_for("bob", "job_a")
    assert [d["id"] for d in jobs.list_for("alice")] == ["job_b", "job_a"]
    assert jobs.list_for("bob") == []
    jobs.check_quota("alice", 1, max_queued=3)
    with pytest.raises(TooManyQueuedError):
        jobs.check_quota("alice", 2, max_queued=3)
    assert jobs.queue_position(jobs.get("job_b") or {}) == 1
    assert jobs.reserve_idempotency("alice", "k", "fp1", "job_a") is None
    assert jobs.reserve_idempotency("alice", "k", "fp1", "job_new") == "job_a"
    assert jobs.reserve_idempotency("bob", "k", "fp1", "job_new") is None
    with pytest.raises(IdempotencyConflictError):
        jobs.reserve_idempotency("alice", "k", "fp2", "job_new")


def test_token_bucket(backend: StateBackend) -> None:
    hourly = 1 / 3600  # one token an hour: nothing refills while the test runs, however slow
    waits = [backend.take_token("rate:x", rate_per_second=hourly, burst=3) for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    # About an hour each: the wait follows the rate, and refused requests take no token (else ~2 h).
    assert all(3000 < wait <= 3600 for wait in waits[3:]), waits
    assert backend.take_token("rate:y", rate_per_second=hourly, burst=3) == 0.0  # buckets are per key
    assert backend.take_token("rate:z", rate_per_second=5.0, burst=1) == 0.0
    wait_until(lambda: backend.take_token("rate:z", rate_per_second=5.0, burst=1) == 0.0, 30, "a refill")


def test_sqlite_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    """Many live processes race to claim the same jobs through the embedded store: one winner per job.

    The racers start together (they wait for a `go` file) and stay alive until every racer has
    answered: a holder that has exited counts as a dead worker, whose jobs may rightly be reclaimed."""
    go = tmp_path / "go"
    script = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from headforge.service.jobs import Claim, JobStore, indexes
from headforge.service.settings import Settings
from headforge.service.state import SqliteState
jobs = JobStore(SqliteState(Path({str(tmp_path / "race.sqlite")!r}), indexer=indexes),
                Settings(data_dir=Path('.'), lease_seconds=60))
while not Path({str(go)!r}).exists():
    time.sleep(0.005)
won = [f"job_{{i}}" for i in range(30) if isinstance(jobs.claim(f"job_{{i}}", {{"host": "h", "pid": os.getpid()}}), Claim)]
print(",".join(won), flush=True)
sys.stdin.read()  # hold the leases until the test has every answer
"""
    jobs = JobStore(SqliteState(tmp_path / "race.sqlite", indexer=indexes), _settings(tmp_path))
    for i in range(30):
        _job(jobs, f"job_{i}")
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    try:
        go.touch()
        outputs = [racer.stdout.readline().strip() for racer in racers if racer.stdout is not None]
    finally:
        for racer in racers:
            racer.communicate(input="", timeout=60)
    winners = [job for out in outputs for job in out.split(",") if job]
    assert sorted(winners) == sorted(f"job_{i}" for i in range(30))


def test_local_store_is_atomic_and_confined(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.put_bytes("jobs/j1/a/result.json", b"{}")
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 3_000_000)
    store.put_file("jobs/j1/a/big.bin", source)
    assert store.size("jobs/j1/a/big.bin") == 3_000_000
    assert b"".join(store.iter_chunks("jobs/j1/a/big.bin")) == source.read_bytes()
    assert store.list("jobs/j1") == ["jobs/j1/a/big.bin", "jobs/j1/a/result.json"]
    assert not list((tmp_path / "artifacts").rglob(".tmp-*"))
    for bad in ("../escape", "/abs", "jobs/../../x", "jobs//x"):
        with pytest.raises(NotFoundError):
            store.put_bytes(bad, b"x")
    with pytest.raises(NotFoundError):
        store.get_bytes("jobs/j1/a/missing")
    assert store.delete_prefix("jobs/j1") == 2 and store.list("jobs") == []


def test_s3_store_against_a_moto_server(tmp_path: Path) -> None:
    import boto3

    with moto_server(tmp_path, "heads") as url:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        store = S3ArtifactStore("heads", prefix="prod", client=client)
        store.ping()
        store.put_bytes("jobs/j1/a/result.json", b'{"ok": true}')
        source = tmp_path / "mesh.glb"
        source.write_bytes(os.urandom(200_000))
        store.put_file("jobs/j1/a/h0.glb", source)
        assert store.get_bytes("jobs/j1/a/result.json") == b'{"ok": true}'
        assert b"".join(store.iter_chunks("jobs/j1/a/h0.glb")) == source.read_bytes()
        assert store.size("jobs/j1/a/h0.glb") == 200_000 and store.size("jobs/j1/a/none") is None
        head = client.head_object(Bucket="heads", Key="prod/jobs/j1/a/h0.glb")
        assert head["ContentType"] == "model/gltf-binary"
        assert store.list("jobs/j1") == ["jobs/j1/a/h0.glb", "jobs/j1/a/result.json"]
        with pytest.raises(NotFoundError):
            store.get_bytes("jobs/j1/a/none")
        assert store.delete_prefix("jobs/j1") == 2 and store.list("jobs") == []
        assert store.local_path("jobs/j1/a/h0.glb") is None


def test_api_keys_are_hashed_and_checked(tmp_path: Path) -> None:
    raw, digest = new_api_key()
    assert digest == hash_key(raw) and raw not in digest
    auth = Authenticator(_settings(tmp_path, api_keys_inline=f"carol:{digest}"))
    assert auth.enabled and auth.authenticate(f"Bearer {raw}").owner == "carol"
    for header in (None, "", f"Basic {raw}", "Bearer ", f"Bearer {raw}x"):
        with pytest.raises(UnauthorizedError):
            auth.authenticate(header)
    open_auth = Authenticator(_settings(tmp_path))
    assert not open_auth.enabled and open_auth.authenticate(None).owner == "anonymous"
    with pytest.raises(ValueError):
        Authenticator(_settings(tmp_path, api_keys_inline="carol:not-a-hash"))


def test_webhook_signature_and_url_policy() -> None:
    body = b'{"event":"job.succeeded"}'
    header = sign(body, "s3cret")
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify(body, "s3cret", header) and not verify(body, "other", header)
    for url in (
        "http://127.0.0.1/hook",
        "http://localhost:8080/x",
        "http://10.1.2.3/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.0.10/",
    ):
        with pytest.raises(WebhookRefusedError):
            check_webhook_url(url, allow_private=False)
    for url in ("ftp://example.com/", "not a url", "http://user:pw@example.com/", "http:///nohost"):
        with pytest.raises(WebhookRefusedError):
            check_webhook_url(url, allow_private=True)
    assert check_webhook_url("http://127.0.0.1:9/hook", allow_private=True) == "http://127.0.0.1:9/hook"
    assert check_webhook_url("https://93.184.215.14/hook", allow_private=False)  # a public literal address


def test_retention_removes_only_jobs_finished_before_the_cutoff(
    backend: StateBackend, tmp_path: Path
) -> None:
    from headforge.service.tasks import remove_job

    jobs = JobStore(backend, _settings(tmp_path, lease_seconds=30))
    store = LocalArtifactStore(tmp_path / "artifacts")
    for job_id in ("job_old", "job_queued"):
        _job(jobs, job_id)
        store.put_bytes(f"inputs/{job_id}/0.jpg", b"jpeg")
    claim = jobs.claim("job_old", A)
    assert isinstance(claim, Claim)
    store.put_bytes("jobs/job_old/a/h0.glb", b"glb")
    assert jobs.complete(
        "job_old", claim.token, artifacts=[{"name": "h0.glb"}], result_key=None, timings_ms={}
    )

    assert jobs.finished_before(time.time() - 3600) == []  # finished just now: inside any TTL
    expired = jobs.finished_before(time.time() + 1)
    assert expired == ["job_old"]  # a queued job never expires, however old
    for job_id in expired:
        remove_job(jobs, store, job_id)
    assert (
        jobs.get("job_old") is None
        and store.list("jobs/job_old") == []
        and store.list("inputs/job_old") == []
    )
    assert jobs.get("job_queued") is not None and store.list("inputs/job_queued") == [
        "inputs/job_queued/0.jpg"
    ]


# --------------------------------------------------------------------------- Celery configuration


def test_celery_app_has_the_documented_production_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What docs/service.md promises of the Celery app, built from the environment as a worker builds it."""
    from celery import Celery

    from headforge.service.celery_app import make_celery

    monkeypatch.setenv("HEADFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HEADFORGE_REDIS_URL", "redis://127.0.0.1:9/0")  # never connected to here
    monkeypatch.setenv("HEADFORGE_TASK_SOFT_TIME_LIMIT", "111")
    monkeypatch.setenv("HEADFORGE_TASK_TIME_LIMIT", "222")
    monkeypatch.setenv("HEADFORGE_VISIBILITY_TIMEOUT", "30")  # shorter than the hard limit: must not win
    settings = Settings.from_env()
    redis_app = make_celery(settings)
    embedded_app = make_celery(Settings(data_dir=tmp_path / "embedded"))
    for celery in (redis_app, embedded_app):
        conf = celery.conf
        assert (conf.task_serializer, conf.result_serializer, conf.event_serializer) == (
            "json",
            "json",
            "json",
        )
        assert list(conf.accept_content) == ["json"]
        assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
        assert conf.worker_prefetch_multiplier == 1
        assert conf.task_ignore_result is True and conf.result_backend is None  # results are not stored
        assert [queue.name for queue in conf.task_queues] == ["cpu", "gpu"]
        assert conf.task_default_queue == "cpu" and conf.task_create_missing_queues is False

    conf = redis_app.conf
    assert conf.broker_url == "redis://127.0.0.1:9/0"
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (111, 222)
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility > conf.task_time_limit
    default = make_celery(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:9/0", hard_time_limit=222))
    assert default.conf.broker_transport_options["visibility_timeout"] == 222 + 300  # the documented default
    assert embedded_app.conf.broker_transport == "headforge.service.broker:SqliteTransport"
    assert embedded_app.conf.broker_url.startswith("sqlite:///")

    # Task options override app defaults, so check the registered tasks too.
    from headforge.service.celery_app import JOB_TASK
    from headforge.service.tasks import app

    assert isinstance(app, Celery)
    job_task = app.tasks[JOB_TASK]
    assert job_task.acks_late is True and job_task.reject_on_worker_lost is True
    assert job_task.serializer == "json"


def test_queue_routes_send_each_pipeline_to_its_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    defaults = Settings(data_dir=tmp_path)
    assert [defaults.queue_for(p) for p in ("facemesh", "flame", "vggheads", "kaolrm", "topos", "other")] == [
        "cpu",
        "cpu",
        "gpu",
        "gpu",
        "gpu",
        "cpu",
    ]
    monkeypatch.setenv("HEADFORGE_QUEUE_ROUTES", "facemesh=gpu, topos=cpu")
    routed = Settings.from_env()
    assert routed.queue_for("facemesh") == "gpu" and routed.queue_for("topos") == "cpu"
    assert routed.queue_for("vggheads") == "gpu"  # the other defaults stay
    monkeypatch.setenv("HEADFORGE_QUEUE_ROUTES", "facemesh=tpu")
    with pytest.raises(ValueError, match="HEADFORGE_QUEUE_ROUTES"):
        Settings.from_env()


def test_dispatch_publishes_json_carrying_only_the_job_id(redis_url: str, tmp_path: Path) -> None:
    """The message a real Redis broker holds after `dispatch`: JSON, on the job's queue, with the id alone."""
    import base64
    import json

    import redis

    from headforge.service.celery_app import JOB_TASK, dispatch, make_celery

    broker_url = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own for kombu's keys
    raw = redis.Redis.from_url(broker_url)
    raw.flushdb()
    settings = _settings(tmp_path, redis_url=broker_url)
    celery = make_celery(settings)
    state = RedisState(broker_url, indexer=indexes, prefix=f"t{time.monotonic_ns()}")
    try:
        jobs = JobStore(state, settings)
        jobs.create_job(
            job_id="job_gpu",
            owner="alice",
            options={"pipeline": "vggheads"},
            inputs=[{"key": "inputs/job_gpu/0.jpg", "filename": "x.jpg"}],
            queue="gpu",
        )
        dispatch(celery, jobs, "job_gpu", "gpu")
        assert raw.llen("cpu") == 0
        messages = raw.lrange("gpu", 0, -1)
        assert len(messages) == 1
        envelope = json.loads(messages[0])
        assert envelope["content-type"] == "application/json"
        assert envelope["headers"]["task"] == JOB_TASK
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert args == ["job_gpu"] and kwargs == {}  # no upload bytes, no options: the job store has them
        doc = jobs.get("job_gpu") or {}
        assert doc["dispatched_at"] is not None and doc["redispatch_due"] > doc["dispatched_at"]
    finally:
        celery.close()
        state.close()
        raw.flushdb()
        raw.close()


# --------------------------------------------------------------------------- retention (the sweeper)


def test_sweep_removes_expired_jobs_artifacts_and_finished_batches(
    backend: StateBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's real `sweep` with a TTL of 0: every finished job goes with its upload and artifacts,
    and so does every batch whose jobs all finished; queued and running jobs and their batches stay."""
    from dataclasses import replace

    from headforge.service.tasks import _ProcessContext, sweep

    for name in ("HEADFORGE_REDIS_URL", "HEADFORGE_S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEADFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HEADFORGE_LEASE_SECONDS", str(LONG_LEASE))
    monkeypatch.setenv("HEADFORGE_JOB_TTL_SECONDS", "3600")
    ctx = _ProcessContext(
        retry_seconds=2.0
    )  # the sweeper's own context: settings and stores from the environment
    ctx.jobs.backend.close()
    ctx.jobs = JobStore(
        backend, ctx.settings
    )  # this test's backend (a prefix of its own on the shared Redis)
    jobs, store = ctx.jobs, ctx.store
    assert isinstance(store, LocalArtifactStore) and store.root == tmp_path / "data" / "artifacts"

    def add(job_id: str) -> None:
        _job(jobs, job_id)
        store.put_bytes(f"inputs/{job_id}/0-x.jpg", b"jpeg")

    def finish(job_id: str) -> None:
        claim = jobs.claim(job_id, A)
        assert isinstance(claim, Claim)
        store.put_bytes(f"jobs/{job_id}/{claim.token}/h0.glb", b"glb")
        assert jobs.complete(
            job_id, claim.token, artifacts=[{"name": "h0.glb"}], result_key=None, timings_ms={}
        )

    for job_id in ("job_ok", "job_bad", "job_canceled", "job_b_ok", "job_waiting", "job_busy"):
        add(job_id)
    finish("job_ok")
    finish("job_b_ok")
    bad = jobs.claim("job_bad", A)
    assert isinstance(bad, Claim) and jobs.fail(
        "job_bad", bad.token, {"code": "no_face", "message": "", "details": {}}
    )
    assert (jobs.cancel("job_canceled") or {})["status"] == "canceled"
    jobs.mark_dispatched("job_waiting")  # published, so the sweeper has no reason to publish it again
    busy = jobs.claim("job_busy", A)  # a live lease (another host's worker)
    assert isinstance(busy, Claim)
    store.put_bytes(f"jobs/job_busy/{busy.token}/partial.bin", b"...")
    jobs.create_batch(batch_id="batch_done", owner="alice", job_ids=["job_ok", "job_bad"], names=["a", "b"])
    jobs.create_batch(
        batch_id="batch_waiting", owner="alice", job_ids=["job_b_ok", "job_waiting"], names=["a", "b"]
    )
    jobs.create_batch(batch_id="batch_busy", owner="alice", job_ids=["job_busy"], names=["a"])
    everything = store.list("")

    def batches() -> set[str]:
        return {
            b for b in ("batch_done", "batch_waiting", "batch_busy") if backend.get("batch", b) is not None
        }

    assert sweep(ctx, "w1@test") == {
        "requeued": 0,
        "redispatched": 0,
        "webhooks": 0,
        "expired": 0,
    }  # all inside the TTL
    assert store.list("") == everything and len(batches()) == 3

    ctx.settings = replace(ctx.settings, job_ttl_seconds=0)
    assert sweep(ctx, "w1@test") == {"requeued": 0, "redispatched": 0, "webhooks": 0, "expired": 4}
    for job_id in ("job_ok", "job_bad", "job_canceled", "job_b_ok"):
        assert jobs.get(job_id) is None
        assert store.list(f"jobs/{job_id}") == [] and store.list(f"inputs/{job_id}") == []
    assert (jobs.get("job_waiting") or {})["status"] == "queued"
    assert (jobs.get("job_busy") or {})["status"] == "running"
    assert store.list("inputs") == ["inputs/job_busy/0-x.jpg", "inputs/job_waiting/0-x.jpg"]
    assert store.list("jobs") == [f"jobs/job_busy/{busy.token}/partial.bin"]
    assert batches() == {"batch_waiting", "batch_busy"}  # a batch with unfinished jobs stays

    assert jobs.complete("job_busy", busy.token, artifacts=[], result_key=None, timings_ms={})
    finish("job_waiting")
    assert sweep(ctx, "w1@test") == {"requeued": 0, "redispatched": 0, "webhooks": 0, "expired": 2}
    assert batches() == set() and store.list("") == []
    assert jobs.count_status("queued") == jobs.count_status("running") == 0


# --------------------------------------------------------------------------- workers per queue


def test_workers_are_counted_per_queue_in_the_metrics(
    backend: StateBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import generate_latest

    from headforge.service.metrics import make_registry

    jobs = JobStore(backend, _settings(tmp_path, worker_queues=("gpu",)))
    now = time.time()
    jobs.worker_seen("cpu-1", ["cpu"], now=now)
    jobs.worker_seen("both-1", ["cpu", "gpu"], now=now)
    jobs.worker_seen("gpu-1", now=now)  # queues from the settings, as in a worker process
    jobs.worker_seen("stale", ["gpu"], now=now - 3600)  # not seen for an hour: not counted
    assert jobs.live_workers(now=now) == 3
    assert (jobs.live_workers(queue="cpu", now=now), jobs.live_workers(queue="gpu", now=now)) == (2, 2)
    text = generate_latest(make_registry(jobs)[0]).decode()
    assert "\nheadforge_workers 3.0\n" in text  # unchanged name and meaning: distinct live workers
    assert 'headforge_queue_workers{queue="cpu"} 2.0' in text
    assert 'headforge_queue_workers{queue="gpu"} 2.0' in text
    jobs.worker_gone("both-1")
    assert (jobs.live_workers(), jobs.live_workers(queue="cpu"), jobs.live_workers(queue="gpu")) == (2, 1, 1)
    monkeypatch.setenv("HEADFORGE_WORKER_QUEUES", "gpu, cpu,gpu")
    assert Settings.from_env().worker_queues == ("gpu", "cpu")
    monkeypatch.setenv("HEADFORGE_WORKER_QUEUES", "cpu,tpu")
    with pytest.raises(ValueError, match="HEADFORGE_WORKER_QUEUES"):
        Settings.from_env()


def test_a_real_worker_registers_under_the_queues_it_consumes(redis_url: str, tmp_path: Path) -> None:
    """`headforge worker -Q gpu` against Redis: its sweeper reports it under `gpu` only, and it leaves
    every count when it stops."""
    import redis
    from stacklib import base_env

    url = redis_url.rsplit("/", 1)[0] + "/6"  # a database of its own: the worker uses the default prefix
    with redis.Redis.from_url(url) as raw:
        raw.flushdb()
    jobs = JobStore(RedisState(url, indexer=indexes), _settings(tmp_path, redis_url=url))
    worker = Process(
        "worker-gpu",
        [sys.executable, "-m", "headforge", "worker", "--queue", "gpu", "--hostname", "gpu-only@%h"],
        base_env(tmp_path, HEADFORGE_REDIS_URL=url),
        tmp_path,
    )
    try:

        def registered() -> bool:
            if not worker.alive:
                raise RuntimeError(worker.tail())
            return jobs.live_workers(queue="gpu") == 1  # written after the overall entry

        wait_until(registered, 120, "the worker to register under gpu")
        assert jobs.live_workers() == 1 and jobs.live_workers(queue="cpu") == 0
    finally:
        worker.stop(timeout=60)
    assert (jobs.live_workers(), jobs.live_workers(queue="gpu")) == (0, 0), worker.tail()
    jobs.backend.close()


def test_a_webhook_attempt_is_made_once(backend: StateBackend, tmp_path: Path) -> None:
    """Two copies of one delivery attempt (the original and a sweeper's republish) send it once, and a
    delivered event is never sent again; a finished job's webhook starts out due."""
    jobs = JobStore(backend, _settings(tmp_path))
    jobs.create_job(
        job_id="job_w", owner="alice", options={}, inputs=[], queue="cpu", webhook_url="http://hook.test/"
    )
    claim = jobs.claim("job_w", A)
    assert isinstance(claim, Claim)
    assert jobs.complete("job_w", claim.token, artifacts=[], result_key=None, timings_ms={}, now=1000.0)
    assert jobs.webhooks_due(1000.0) == ["job_w"]
    assert jobs.start_webhook_attempt("job_w", "job.succeeded", 1, due_again_at=1030.0)
    assert not jobs.start_webhook_attempt("job_w", "job.succeeded", 1, due_again_at=1031.0)  # the copy
    assert jobs.webhooks_due(1029.0) == [] and jobs.webhooks_due(1030.0) == ["job_w"]  # in flight, then due
    assert jobs.take_due_webhook("job_w", now=1100.0, before=1030.0) == ("job.succeeded", 2, "cpu")
    assert jobs.take_due_webhook("job_w", now=1101.0, before=1030.0) is None  # one sweeper takes it
    jobs.set_webhook_state(
        "job_w", {"event": "job.succeeded", "attempts": 2, "delivered": True, "due_at": None}
    )
    assert not jobs.start_webhook_attempt("job_w", "job.succeeded", 3, due_again_at=1200.0)
    assert jobs.webhooks_due(float("inf")) == []

    # A cancel records its webhook as due too, so a gateway that fails to publish it loses nothing.
    jobs.create_job(
        job_id="job_c", owner="alice", options={}, inputs=[], queue="gpu", webhook_url="http://hook.test/"
    )
    assert (jobs.cancel("job_c") or {})["status"] == "canceled"
    assert jobs.webhooks_due(float("inf")) == ["job_c"]
    assert jobs.take_due_webhook("job_c", now=time.time(), before=float("inf")) == ("job.canceled", 1, "gpu")


def test_an_unresolvable_webhook_host_is_its_own_refusal() -> None:
    """Refused at submission like any bad URL (422), but a subclass the worker retries: DNS can recover."""
    from headforge.errors import WebhookHostUnresolvedError, WebhookRefusedError
    from headforge.service.webhooks import check_webhook_url

    with pytest.raises(WebhookHostUnresolvedError) as unresolved:
        check_webhook_url("https://no-such-host.invalid/hook", allow_private=False)
    assert isinstance(unresolved.value, WebhookRefusedError)
    assert unresolved.value.code == "webhook_url_refused" and unresolved.value.http_status == 422
    with pytest.raises(WebhookRefusedError) as private:
        check_webhook_url("http://127.0.0.1/hook", allow_private=False)
    assert not isinstance(private.value, WebhookHostUnresolvedError)
