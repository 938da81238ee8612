"""Service settings, read once from `HEADFORGE_*` environment variables.

Nothing here imports Celery, Redis or FastAPI, so the CLI can read settings cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from headforge.config import headforge_home

QUEUES = ("cpu", "gpu")
# Set inside a worker process (from Celery's -Q selection) so its sweeper can register per queue.
WORKER_QUEUES_ENV = "HEADFORGE_WORKER_QUEUES"
DEFAULT_QUEUE_ROUTES = {"facemesh": "cpu", "flame": "cpu", "vggheads": "gpu", "kaolrm": "gpu", "topos": "gpu"}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from error


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as error:
        raise ValueError(f"{name} must be a number, got {raw!r}") from error


def _env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in ("1", "true", "yes", "on")


def _parse_routes(raw: str) -> dict[str, str]:
    """`facemesh=gpu,flame=cpu` → mapping, on top of the defaults."""
    routes = dict(DEFAULT_QUEUE_ROUTES)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        pipeline, _, queue = item.partition("=")
        if queue not in QUEUES:
            raise ValueError(f"HEADFORGE_QUEUE_ROUTES: queue for {pipeline!r} must be one of {QUEUES}")
        routes[pipeline.strip()] = queue
    return routes


def _parse_queues(raw: str) -> tuple[str, ...]:
    """`cpu,gpu` → ("cpu", "gpu"), each a known queue, in order, without repeats."""
    queues = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    unknown = [queue for queue in queues if queue not in QUEUES]
    if unknown:
        raise ValueError(f"{WORKER_QUEUES_ENV}: unknown queue(s) {unknown}; choose among {list(QUEUES)}")
    return queues


@dataclass(frozen=True)
class Settings:
    """Everything the gateway and the workers need to agree on."""

    data_dir: Path
    redis_url: str | None = None
    api_keys_file: Path | None = None
    api_keys_inline: str = ""
    rate_limit_per_minute: float = 120.0
    rate_limit_burst: int = 30
    max_queued_per_key: int = 100
    max_upload_bytes: int = 20 * 1024 * 1024
    max_files_per_job: int = 8
    max_files_per_batch: int = 200
    max_request_bytes: int = 512 * 1024 * 1024
    # Seconds a request body may take in all, and between two of its chunks (docs/service.md).
    body_timeout: float = 600.0
    body_idle_timeout: float = 30.0
    # Uploads checked (decoded) at once by the gateway; more wait their turn.
    max_concurrent_decodes: int = 2
    job_ttl_seconds: int = 7 * 24 * 3600
    webhook_secret: str = ""
    webhook_allow_private: bool = False
    webhook_max_attempts: int = 6
    webhook_republish_after: float = 300.0
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    soft_time_limit: int = 300
    hard_time_limit: int = 360
    visibility_timeout: int = 0  # 0: hard_time_limit + 300
    lease_seconds: float = 30.0
    sweep_interval: float = 10.0
    redispatch_after: float = 0.0  # 0: visibility_timeout
    max_attempts: int = 3
    queue_routes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_QUEUE_ROUTES))
    json_logs: bool = True
    cors_origins: tuple[str, ...] = ()
    worker_queues: tuple[str, ...] = ()  # the queues this worker process consumes (empty elsewhere)

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(os.environ.get("HEADFORGE_DATA_DIR", "") or headforge_home() / "data").expanduser()
        keys_file = os.environ.get("HEADFORGE_API_KEYS_FILE", "").strip()
        cors = os.environ.get("HEADFORGE_CORS_ORIGINS", "").strip()
        return cls(
            data_dir=data_dir,
            redis_url=os.environ.get("HEADFORGE_REDIS_URL", "").strip() or None,
            api_keys_file=Path(keys_file).expanduser() if keys_file else None,
            api_keys_inline=os.environ.get("HEADFORGE_API_KEYS", "").strip(),
            rate_limit_per_minute=_env_float("HEADFORGE_RATE_LIMIT_PER_MINUTE", 120.0),
            rate_limit_burst=_env_int("HEADFORGE_RATE_LIMIT_BURST", 30),
            max_queued_per_key=_env_int("HEADFORGE_MAX_QUEUED_PER_KEY", 100),
            max_upload_bytes=_env_int("HEADFORGE_MAX_UPLOAD_BYTES", 20 * 1024 * 1024),
            max_files_per_job=_env_int("HEADFORGE_MAX_FILES_PER_JOB", 8),
            max_files_per_batch=_env_int("HEADFORGE_MAX_FILES_PER_BATCH", 200),
            max_request_bytes=_env_int("HEADFORGE_MAX_REQUEST_BYTES", 512 * 1024 * 1024),
            body_timeout=_env_float("HEADFORGE_BODY_TIMEOUT", 600.0),
            body_idle_timeout=_env_float("HEADFORGE_BODY_IDLE_TIMEOUT", 30.0),
            max_concurrent_decodes=max(1, _env_int("HEADFORGE_MAX_CONCURRENT_DECODES", 2)),
            job_ttl_seconds=_env_int("HEADFORGE_JOB_TTL_SECONDS", 7 * 24 * 3600),
            webhook_secret=os.environ.get("HEADFORGE_WEBHOOK_SECRET", ""),
            webhook_allow_private=_env_bool("HEADFORGE_WEBHOOK_ALLOW_PRIVATE"),
            webhook_max_attempts=_env_int("HEADFORGE_WEBHOOK_MAX_ATTEMPTS", 6),
            webhook_republish_after=_env_float("HEADFORGE_WEBHOOK_REPUBLISH_AFTER", 300.0),
            s3_bucket=os.environ.get("HEADFORGE_S3_BUCKET", "").strip() or None,
            s3_prefix=os.environ.get("HEADFORGE_S3_PREFIX", "").strip(),
            s3_endpoint_url=os.environ.get("HEADFORGE_S3_ENDPOINT_URL", "").strip() or None,
            s3_region=os.environ.get("HEADFORGE_S3_REGION", "").strip() or None,
            soft_time_limit=_env_int("HEADFORGE_TASK_SOFT_TIME_LIMIT", 300),
            hard_time_limit=_env_int("HEADFORGE_TASK_TIME_LIMIT", 360),
            visibility_timeout=_env_int("HEADFORGE_VISIBILITY_TIMEOUT", 0),
            lease_seconds=_env_float("HEADFORGE_LEASE_SECONDS", 30.0),
            sweep_interval=_env_float("HEADFORGE_SWEEP_INTERVAL", 10.0),
            redispatch_after=_env_float("HEADFORGE_REDISPATCH_AFTER", 0.0),
            max_attempts=_env_int("HEADFORGE_MAX_ATTEMPTS", 3),
            queue_routes=_parse_routes(os.environ.get("HEADFORGE_QUEUE_ROUTES", "")),
            json_logs=_env_bool("HEADFORGE_JSON_LOGS", True),
            cors_origins=tuple(o.strip() for o in cors.split(",") if o.strip()),
            worker_queues=_parse_queues(os.environ.get(WORKER_QUEUES_ENV, "")),
        )

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: SQLite broker and job store on local disk."""
        return self.redis_url is None

    @property
    def effective_visibility_timeout(self) -> int:
        """Broker redelivery delay for unacked messages; always longer than the hard limit."""
        return (
            max(self.visibility_timeout, self.hard_time_limit + 60)
            if self.visibility_timeout
            else (self.hard_time_limit + 300)
        )

    @property
    def effective_redispatch_after(self) -> float:
        """How long a dispatched job may sit queued before the sweeper publishes it again."""
        return self.redispatch_after or float(self.effective_visibility_timeout)

    @property
    def broker_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return f"sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def state_path(self) -> Path:
        """The embedded job store (SQLite)."""
        return self.data_dir / "state.sqlite"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def queue_for(self, pipeline: str) -> str:
        """The queue a pipeline's jobs go to: `HEADFORGE_QUEUE_ROUTES`, else the pipeline row's `queue`."""
        if pipeline in self.queue_routes:
            return self.queue_routes[pipeline]
        from headforge.pipeline.registry import PIPELINES

        row = PIPELINES.get(pipeline)
        return row.queue if row is not None else "cpu"
