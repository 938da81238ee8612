"""Session fixtures for the service tests (see stacklib.py for the process helpers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from stacklib import Stack, running_stack


@pytest.fixture(scope="session")
def redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared stack: Redis (AOF), one worker with two pool processes, the API, auth on."""
    with running_stack(tmp_path_factory.mktemp("redis-stack"), redis=True, worker_concurrency=2) as stack:
        yield stack
