"""The service's parts on their own: job-store transitions on both backends (real Redis, real SQLite),
the token bucket, artifact stores (local and S3 via a moto server), API keys and webhook checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stacklib import Process, free_port, require_redis, wait_until

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
    server = Process("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", str(root)], dict(os.environ), root)
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


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path, "lease_seconds": 0.5, "max_attempts": 3}
    values.update(overrides)
    return Settings(**values)


def _job(jobs: JobStore, job_id: str = "job_1", owner: str = "alice") -> dict[str, Any]:
    return jobs.create_job(job_id=job_id, owner=owner, options={"pipeline": "facemesh"},
                           inputs=[{"key": "inputs/x", "filename": "x.jpg"}], queue="cpu")


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
    assert jobs.complete("job_1", first.token, artifacts=[{"name": "a"}], result_key="k", timings_ms={"x": 1.0})
    assert not jobs.complete("job_1", first.token, artifacts=[], result_key=None, timings_ms={})
    assert jobs.claim("job_1", B) == "succeeded"  # redelivery after success is a no-op
    done = jobs.get("job_1") or {}
    assert done["status"] == "succeeded" and done["artifacts"] == [{"name": "a"}]
    assert backend.counters("jobs_finished")["succeeded"] == 1
    assert jobs.count_status("succeeded") == 1 and jobs.count_status("running") == 0


def test_expired_lease_is_released_and_reclaimed(backend: StateBackend, tmp_path: Path) -> None:
    jobs = JobStore(backend, _settings(tmp_path))
    _job(jobs)
    first = jobs.claim("job_1", A)
    assert isinstance(first, Claim)
    assert not jobs.release("job_1", None)  # lease still live
    assert jobs.heartbeat("job_1", first.token, {"detect": 0.5})
    wait_until(lambda: jobs.expired_leases(time.time()) == ["job_1"], 5, "the lease to expire")
    assert jobs.release("job_1", None)
    assert not jobs.heartbeat("job_1", first.token)  # the old holder learns it lost the job
    second = jobs.claim("job_1", B)
    assert isinstance(second, Claim) and second.job["attempts"] == 2
    assert not jobs.complete("job_1", first.token, artifacts=[], result_key=None, timings_ms={})
    assert jobs.complete("job_1", second.token, artifacts=[], result_key=None, timings_ms={})


def test_attempts_are_bounded(backend: StateBackend, tmp_path: Path) -> None:
    jobs = JobStore(backend, _settings(tmp_path, max_attempts=1))
    _job(jobs)
    assert isinstance(jobs.claim("job_1", A), Claim)
    time.sleep(0.6)
    assert jobs.release("job_1", None)
    assert jobs.claim("job_1", B) == "failed"
    failed = jobs.get("job_1") or {}
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"


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
    waits = [backend.take_token("rate:x", rate_per_second=1.0, burst=3) for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 0.0 < waits[3] <= 1.0 and 0.0 < waits[4] <= 1.0  # refused requests take no token
    time.sleep(waits[4] + 0.05)
    assert backend.take_token("rate:x", rate_per_second=1.0, burst=3) == 0.0  # refilled at the given rate
    assert backend.take_token("rate:y", rate_per_second=1.0, burst=3) == 0.0


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
jobs = JobStore(SqliteState(Path({str(tmp_path / 'race.sqlite')!r}), indexer=indexes),
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
    racers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
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
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    from shutil import which

    if which("moto_server") is None and not (Path(sys.executable).parent / "moto_server").exists():
        pytest.skip("moto_server is not installed")
    port = free_port()
    server = Process("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                     {**os.environ}, tmp_path)
    try:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "moto_server")
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket="heads")
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
    finally:
        server.stop()


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
    for url in ("http://127.0.0.1/hook", "http://localhost:8080/x", "http://10.1.2.3/", "http://[::1]/",
                "http://169.254.169.254/latest/meta-data", "http://192.168.0.10/"):
        with pytest.raises(WebhookRefusedError):
            check_webhook_url(url, allow_private=False)
    for url in ("ftp://example.com/", "not a url", "http://user:pw@example.com/", "http:///nohost"):
        with pytest.raises(WebhookRefusedError):
            check_webhook_url(url, allow_private=True)
    assert check_webhook_url("http://127.0.0.1:9/hook", allow_private=True) == "http://127.0.0.1:9/hook"
    assert check_webhook_url("https://93.184.215.14/hook", allow_private=False)  # a public literal address


def test_retention_removes_only_jobs_finished_before_the_cutoff(backend: StateBackend, tmp_path: Path) -> None:
    from headforge.service.tasks import remove_job

    jobs = JobStore(backend, _settings(tmp_path, lease_seconds=30))
    store = LocalArtifactStore(tmp_path / "artifacts")
    for job_id in ("job_old", "job_queued"):
        _job(jobs, job_id)
        store.put_bytes(f"inputs/{job_id}/0.jpg", b"jpeg")
    claim = jobs.claim("job_old", A)
    assert isinstance(claim, Claim)
    store.put_bytes("jobs/job_old/a/h0.glb", b"glb")
    assert jobs.complete("job_old", claim.token, artifacts=[{"name": "h0.glb"}], result_key=None, timings_ms={})

    assert jobs.finished_before(time.time() - 3600) == []  # finished just now: inside any TTL
    expired = jobs.finished_before(time.time() + 1)
    assert expired == ["job_old"]  # a queued job never expires, however old
    for job_id in expired:
        remove_job(jobs, store, job_id)
    assert jobs.get("job_old") is None and store.list("jobs/job_old") == [] and store.list("inputs/job_old") == []
    assert jobs.get("job_queued") is not None and store.list("inputs/job_queued") == ["inputs/job_queued/0.jpg"]
