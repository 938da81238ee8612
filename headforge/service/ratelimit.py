"""Per-key limits: a token bucket on requests that create or delete work, and a cap on unfinished jobs."""

from __future__ import annotations

import math

from headforge.errors import RateLimitedError
from headforge.service.auth import Principal
from headforge.service.state import StateBackend


def check_rate(backend: StateBackend, principal: Principal) -> None:
    """Take one token from the caller's bucket, or raise `RateLimitedError` with `retry_after`."""
    rate = principal.rate_limit_per_minute / 60.0
    if rate <= 0:
        return
    wait = backend.take_token(f"rate:{principal.owner}", rate, max(1, principal.rate_limit_burst))
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise RateLimitedError(
            f"rate limit of {principal.rate_limit_per_minute:g} requests per minute reached; retry in {retry_after} s",
            details={"retry_after": retry_after, "limit_per_minute": principal.rate_limit_per_minute},
        )
