"""Session fixtures for the service tests (see stacklib.py for the process helpers)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from stacklib import Stack, make_stack, require_models, require_redis


@pytest.fixture(scope="session")
def redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared stack: Redis (AOF), one worker with two pool processes, the API, auth on."""
    require_redis()
    require_models()
    stack = make_stack(tmp_path_factory.mktemp("redis-stack"), redis=True)
    try:
        stack.start_redis()
        stack.start_worker(concurrency=2)
        stack.start_api()
        stack.wait_for_workers(1)
        yield stack
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()

