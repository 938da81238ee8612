"""Structured logging: one JSON object per line, carrying the current job id.

Usage::

    from headforge.observability import configure_logging, job_context

    configure_logging()                 # once per process (API, worker, CLI)
    with job_context(job_id):
        log.info("stage done", extra={"stage": "detect"})

Every record logged inside ``job_context`` gets a ``job_id`` field; records outside one don't.
Extra attributes passed with ``extra=`` are copied into the JSON object when they are JSON-friendly.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("headforge_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

_HANDLER_MARK = "_headforge_handler"


def current_job_id() -> str | None:
    """The job id bound by the innermost active `job_context`, or None."""
    return _job_id.get()


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Bind `job_id` to every log record emitted in this block (thread- and task-local)."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def _jsonable(value: Any) -> Any:
    """Return `value` if json can encode it, else its `str()`."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: timestamp, level, logger, message, job_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or _job_id.get()
        if job_id is not None:
            document["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in document:
                document[key] = _jsonable(value)
        if record.exc_info:
            document["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local use, with the job id when one is bound."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None) or _job_id.get()
        return f"{line} [job={job_id}]" if job_id else line


def configure_logging(
    json_logs: bool = True,
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install one handler on the root logger (replacing a previous headforge one) and return it.

    `json_logs` picks `JsonFormatter` or `TextFormatter`; `level` accepts a number or a name
    such as ``"DEBUG"``; `stream` defaults to stderr. Calling it twice does not duplicate lines.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
