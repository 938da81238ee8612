"""Structured JSON logging with the job id from a contextvar."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from headforge.observability import configure_logging, current_job_id, job_context


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Configure JSON logging into a buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging(json_logs=True, level="DEBUG", stream=buffer)
    yield buffer
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_json_line_has_required_fields(captured: io.StringIO) -> None:
    logging.getLogger("headforge.test").warning("hello %s", "world")
    (line,) = _lines(captured)
    assert line["message"] == "hello world"
    assert line["level"] == "WARNING"
    assert line["logger"] == "headforge.test"
    stamp = datetime.fromisoformat(str(line["timestamp"]))
    assert stamp.tzinfo is not None
    assert "job_id" not in line


def test_job_id_bound_only_inside_context(captured: io.StringIO) -> None:
    log = logging.getLogger("headforge.jobs")
    with job_context("job-123"):
        assert current_job_id() == "job-123"
        log.info("inside")
        with job_context("job-456"):
            log.info("nested")
        log.info("back")
    log.info("outside")
    assert current_job_id() is None
    lines = _lines(captured)
    assert [line.get("job_id") for line in lines] == ["job-123", "job-456", "job-123", None]


def test_context_is_task_local(captured: io.StringIO) -> None:
    log = logging.getLogger("headforge.async")

    async def one(job: str) -> None:
        with job_context(job):
            await asyncio.sleep(0)
            log.info("step", extra={"stage": job.upper()})

    async def both() -> None:
        await asyncio.gather(one("a"), one("b"))

    asyncio.run(both())
    pairs = {
        (line["job_id"], line["stage"]) for line in _lines(captured) if line["logger"] == "headforge.async"
    }
    assert pairs == {("a", "A"), ("b", "B")}


def test_extras_and_exceptions(captured: io.StringIO) -> None:
    log = logging.getLogger("headforge.extra")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"stage": "fit", "duration_s": 0.25, "obj": object()})
    (line,) = _lines(captured)
    assert line["stage"] == "fit"
    assert line["duration_s"] == 0.25
    assert isinstance(line["obj"], str)
    assert "ValueError: boom" in str(line["exc_info"])
    assert line["level"] == "ERROR"


def test_level_filters_and_reconfigure_does_not_duplicate() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging(level=logging.WARNING, stream=first)
        configure_logging(level="WARNING", stream=second)
        log = logging.getLogger("headforge.level")
        log.info("dropped")
        log.warning("kept")
        assert first.getvalue() == ""
        assert [line["message"] for line in _lines(second)] == ["kept"]
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_text_mode_includes_job_id() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        buffer = io.StringIO()
        configure_logging(json_logs=False, stream=buffer)
        with job_context("j-9"):
            logging.getLogger("headforge.text").info("plain")
        text = buffer.getvalue()
        assert "plain" in text and "job=j-9" in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
