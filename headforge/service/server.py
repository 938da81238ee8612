"""The API's HTTP server: uvicorn with a deadline for request headers.

uvicorn restarts its keep-alive timer on every byte it receives and has no timer at all before a
connection's first request, so a client that trickles its headers a byte at a time holds a
connection (and its memory) for as long as it likes. `GuardedH11Protocol` gives every request
`HEADFORGE_HEADER_TIMEOUT` seconds (default 10) from the connection's start, or from the end of the
previous response, to finish its headers, and closes the connection when they are late. The body's
read timeouts are the gateway's own (`headforge.service.app`, `HEADFORGE_BODY_TIMEOUT`).

`headforge serve` runs `run_api`; `python -m headforge.service.server --host H --port P` runs the
same server without the embedded worker (the service tests use it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_ENV = "HEADFORGE_HEADER_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 10.0


def header_timeout_from_env() -> float:
    """Seconds a client gets to send a request's headers (`HEADFORGE_HEADER_TIMEOUT`, default 10)."""
    raw = os.environ.get(HEADER_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_HEADER_TIMEOUT
    except ValueError as error:
        raise ValueError(f"{HEADER_TIMEOUT_ENV} must be a number, got {raw!r}") from error
    return value if value > 0 else DEFAULT_HEADER_TIMEOUT


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers arrive too slowly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout_from_env()
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        # Still waiting for (the rest of) a request line and headers: drop the connection.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)


def run_api(host: str, port: int, workers: int = 1) -> None:
    """Serve `headforge.service.app:app_from_env` with the header deadline (blocks until shutdown)."""
    import uvicorn

    uvicorn.run(
        "headforge.service.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        http=GuardedH11Protocol,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="headforge API server (no embedded worker)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    run_api(args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
