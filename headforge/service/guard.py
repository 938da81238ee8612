"""The gateway's outermost ASGI layer: API key and size checks before any body is read, and read
timeouts while it is.

FastAPI parses a multipart body (spooling every part to disk) before a handler runs, so a check
in the handler comes after the whole body. `BodyGuard` sits in front of that: a request that can
carry a body (any method but GET, HEAD and OPTIONS) to `/v1/` is refused with 401 before one body
byte is read when its key is missing or unknown; one whose Content-Length is over the request limit
gets 413 at once; and while a body arrives (chunked or not) its bytes are counted, so reading stops
at the limit with 413, and a body that takes longer than `body_timeout` in all, or pauses longer
than `body_idle_timeout`, ends with 408. These refusals close the connection (`Connection: close`),
so the unread rest of the body is never taken in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from headforge.errors import FileTooLargeError, HeadforgeError, RequestTimeoutError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyRefused(Exception):
    """Raised from `receive` once the body is refused; whatever the app answers is replaced."""


class BodyGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        body_timeout: float,
        body_idle_timeout: float,
        authenticate: Callable[[str | None], object],
        respond: Callable[[HeadforgeError], Any],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.body_idle_timeout = body_idle_timeout
        self.authenticate = authenticate
        self.respond = respond

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: HeadforgeError) -> None:
        response = self.respond(error)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if str(scope.get("path", "")).startswith("/v1/"):
            try:
                self.authenticate(headers.get("authorization"))
            except HeadforgeError as error:
                await self._refuse(scope, receive, send, error)
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, self._too_large())
            return
        started = time.monotonic()
        received = 0
        body_done = False
        refusal: HeadforgeError | None = None
        response_started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refusal
            if refusal is not None:
                raise BodyRefused(refusal.message)
            if body_done:  # later calls wait for the disconnect: no deadline for those
                return await receive()
            remaining = self.body_timeout - (time.monotonic() - started)
            try:
                message = await asyncio.wait_for(
                    receive(), timeout=max(0.001, min(self.body_idle_timeout, remaining))
                )
            except TimeoutError:
                refusal = RequestTimeoutError(
                    "the request body arrived too slowly",
                    details={"body_timeout": self.body_timeout, "body_idle_timeout": self.body_idle_timeout},
                )
                raise BodyRefused(refusal.message) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refusal = self._too_large()
                    raise BodyRefused(refusal.message)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None and not response_started:
                return  # the app's answer to the broken-off body is replaced below
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refusal is None or response_started:
                raise
        if refusal is not None and not response_started:
            await self._refuse(scope, receive, send, refusal)

    def _too_large(self) -> FileTooLargeError:
        return FileTooLargeError(
            f"the request body is over the {self.max_bytes} byte limit", details={"max_bytes": self.max_bytes}
        )
