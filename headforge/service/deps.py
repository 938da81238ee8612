"""What route handlers get from FastAPI's dependency injection: the app's `ServiceState` and the
caller's `Principal` (the API key, read from `Authorization: Bearer`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from headforge.service.auth import Authenticator, Principal
from headforge.service.jobs import JobStore
from headforge.service.settings import Settings
from headforge.service.store import ArtifactStore


@dataclass
class ServiceState:
    """Everything the routes share, built once by `create_app` and kept on `app.state.headforge`."""

    settings: Settings
    jobs: JobStore
    store: ArtifactStore
    auth: Authenticator
    celery: Any
    registry: Any = None  # the Prometheus registry behind /metrics
    decode_gate: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    aio_redis: list[Any] = field(default_factory=list)  # one lazily made redis.asyncio client (wait=)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.headforge
    return state


def require_principal(
    state: Annotated[ServiceState, Depends(get_state)],
    authorization: Annotated[str | None, Header(description="`Bearer <API key>`")] = None,
) -> Principal:
    """The caller, or 401 `unauthorized` (anonymous when the server has no keys configured)."""
    return state.auth.authenticate(authorization)


State = Annotated[ServiceState, Depends(get_state)]
CurrentPrincipal = Annotated[Principal, Depends(require_principal)]
