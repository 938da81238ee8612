"""Process set-up for anything that runs the pipeline (CLI, worker, benchmarks): malloc tuning and
opening the networks a process's pipelines use before the first job."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from functools import lru_cache

from headforge.models.runtime import ModelSet, load_model_set

# glibc malloc settings (mallopt parameters): blocks up to 32 MiB come from the heap, and the heap
# is returned to the system only past 128 MiB free at its top.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCK_LIMIT, _HEAP_TRIM_THRESHOLD = 32 << 20, 128 << 20


@lru_cache(maxsize=1)
def keep_freed_memory() -> None:
    """Let the process reuse the memory the stages free instead of giving it back after every photo.

    Each photo allocates and frees tens of MiB of arrays (texels, maps, images); with glibc's
    defaults much of it goes back to the system and comes back as fresh pages, about 8,000 page
    faults per photo at texture 1024 (more than 10 % of the pipeline's time on 2 cores). Skipped
    where the MALLOC_* environment variables already tune malloc, and outside glibc."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows)
        return
    mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_LIMIT)
    mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_THRESHOLD)


def import_pipeline_modules() -> None:
    """Import the shared steps (and with them trimesh, scipy, OpenCV) and run every registered
    pipeline's `prepare` hook, so a worker's first job does not pay for them (nor lose a soft time
    limit inside trimesh's guarded imports, which swallow `BaseException`)."""
    import logging

    from headforge.pipeline import (  # noqa: F401
        decode,
        detect,
        geometry,
        landmarks,
        package,
        pose,
        preview,
        splats,
        texture,
        topology,
    )
    from headforge.pipeline.registry import PIPELINES

    for row in PIPELINES.values():
        if row.prepare is not None and row.missing_reason() is None:
            try:
                row.prepare()
            except Exception as error:  # its jobs report the problem themselves
                logging.getLogger("headforge.worker").warning("could not prepare %s: %s", row.name, error)


def prepare_process(pipelines: Sequence[str] | None = None) -> ModelSet:
    """Tune malloc and open the networks of `pipelines` (default: every registered pipeline that can
    run here) in this process's model set, which it returns."""
    from headforge.pipeline.registry import PIPELINES, networks_for

    keep_freed_memory()
    if pipelines is None:
        pipelines = [name for name, row in sorted(PIPELINES.items()) if row.missing_reason() is None]
    models = load_model_set()
    models.preload(networks_for(pipelines))
    return models
