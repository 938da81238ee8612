"""The FastAPI gateway: validates uploads, stores them, records jobs and publishes their ids.

It never runs the pipeline. `create_app` builds the shared `ServiceState`, the middleware and the
error handlers, and includes one router per concern (`headforge/service/routes/`, plus
`retopology.py`). Every error leaves as `{"error": {"code", "message", "details"}}` with a code from
`headforge.errors` (validation errors from FastAPI included); response bodies are the Pydantic
models of `headforge/service/contracts.py`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from headforge.service import animate
from headforge.service.auth import Authenticator
from headforge.service.celery_app import make_celery
from headforge.service.deps import ServiceState
from headforge.service.guard import BodyGuard
from headforge.service.http_errors import ERROR_RESPONSES, error_body, error_response, install_error_handlers
from headforge.service.jobs import JobStore, make_backend
from headforge.service.metrics import make_registry
from headforge.service.retopology import router as retopology_router
from headforge.service.routes import batches, jobs, models, ops
from headforge.service.routes.models import describe_models
from headforge.service.settings import Settings
from headforge.service.store import make_store
from headforge.service.uploads import Upload, validate_image, validate_options
from headforge.service.uploads import fingerprint as _fingerprint
from headforge.service.uploads import unzip as _unzip

__all__ = [
    "ERROR_RESPONSES",
    "ServiceState",
    "Upload",
    "_fingerprint",
    "_unzip",
    "app_from_env",
    "create_app",
    "describe_models",
    "error_body",
    "error_response",
    "validate_image",
    "validate_options",
]

log = logging.getLogger("headforge.api")
STATIC_DIR = Path(__file__).parent / "static"
ROUTERS = (jobs.router, animate.router, batches.router, retopology_router, models.router, ops.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway for `settings` (default: from the environment)."""
    from headforge.observability import configure_logging

    settings = settings or Settings.from_env()
    configure_logging(json_logs=settings.json_logs)
    job_store = JobStore(make_backend(settings, retry_seconds=3.0), settings)
    registry, request_counter, request_latency = make_registry(job_store)
    state = ServiceState(
        settings,
        job_store,
        make_store(settings),
        Authenticator(settings),
        make_celery(settings),
        registry=registry,
        decode_gate=threading.BoundedSemaphore(settings.max_concurrent_decodes),
    )
    if not state.auth.enabled:
        message = (
            "headforge: WARNING: no API keys configured (HEADFORGE_API_KEYS_FILE / HEADFORGE_API_KEYS): "
            "authentication is OFF; anyone who can reach this port can submit and read jobs"
        )
        print(message, file=sys.stderr, flush=True)
        log.warning("authentication is off: no API keys configured")

    app = FastAPI(
        title="headforge",
        version="0.1.0",
        description='Photos of people in, 3D head assets out. Errors: `{"error": {code, message, details}}`.',
        responses=ERROR_RESPONSES,
    )
    app.state.headforge = state
    for router in ROUTERS:
        app.include_router(router)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_error_handlers(app)

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Any]) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "other")
        request_counter.labels(request.method, label, str(response.status_code)).inc()
        request_latency.labels(label).observe(time.perf_counter() - started)
        return response

    # Outermost: the key and the size limit are checked before any body byte is read (guard.py).
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_request_bytes,
        body_timeout=settings.body_timeout,
        body_idle_timeout=settings.body_idle_timeout,
        authenticate=state.auth.authenticate,
        respond=error_response,
    )

    if (STATIC_DIR / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="web")
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory headforge.service.app:app_from_env`."""
    return create_app()
