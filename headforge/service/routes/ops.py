"""Operations: liveness, readiness (job store, artifact store and broker reachable) and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from headforge.errors import ServiceUnavailableError
from headforge.service.contracts import Health, Ready
from headforge.service.deps import State
from headforge.service.http_errors import documented, error_response

router = APIRouter(tags=["operations"])


def _ping_broker(celery: Any) -> None:
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


@router.get("/healthz", summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: job store, artifact store and broker reachable",
    response_model=Ready,
    responses=documented(503),
)
def readyz(state: State) -> Ready | JSONResponse:
    checks: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, probe in (
        ("state", state.jobs.backend.ping),
        ("store", state.store.ping),
        ("broker", lambda: _ping_broker(state.celery)),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as error:
            failures[name] = str(getattr(error, "message", error))
    if failures:
        names = ", ".join(sorted(failures))
        return error_response(
            ServiceUnavailableError(
                f"not ready: {names} unreachable", details={"failed": failures, "ok": checks}
            )
        )
    return Ready(status="ready", checks=checks, workers=state.jobs.live_workers())


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(state: State) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
