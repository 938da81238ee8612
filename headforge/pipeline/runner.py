"""The runner: a capture (1..N photos) → every artifact on disk, plus the `result.json` document.

decode ► models ► heads (the pipeline's head source, per view) ► the pipeline's stages (batched
over every head of the capture) ► texture ► splats (each skipped for a head a stage filled) ►
package ► preview ► result. The CLI, the Celery worker and the benchmarks all call
`reconstruct_image` (one photo) or `reconstruct_capture` (one subject's photos).

A subject capture (`subject=true`, 1..8 photos) keeps one head per view, picked in
`subject.pick_subject_heads`; its stages see those heads together (the FLAME fit shares one
identity between them) and `result.json` gets a `subject` section (docs/subjects.md).

File names: a one-photo capture writes `h0.glb`, `h0_splats.ply`, ..., `preview.png` as always; a
capture of several views names the view first (`v1_h0.glb`, `v1_preview.png`), and `result.json`
lists the views.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from headforge.errors import HeadforgeError, InvalidOptionError, PipelineUnavailableError
from headforge.models.runtime import ModelSet
from headforge.pipeline.options import ReconstructOptions
from headforge.pipeline.package import WrittenFile, encode_png, json_bytes, write_atomic, write_head_files
from headforge.pipeline.process import keep_freed_memory
from headforge.pipeline.registry import Pipeline, Stage, get_pipeline, require_available
from headforge.pipeline.result import Written, build_document, remove_stale_artifacts
from headforge.pipeline.subject import (
    SubjectPick,
    check_subject_photo_count,
    pick_subject_heads,
    subject_document,
)
from headforge.pipeline.types import Capture, Head, Splats, StageContext, View

if TYPE_CHECKING:
    from headforge.pipeline.texturing import SubjectTexture, TextureStats

Progress = Callable[[str, float], None]


@dataclass
class _Timer:
    """Accumulates wall time per stage, in milliseconds, in first-seen order."""

    timings_ms: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            with self._lock:
                self.timings_ms[name] = self.timings_ms.get(name, 0.0) + elapsed


def reconstruct_image(
    data: bytes,
    filename: str,
    options: ReconstructOptions,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    networks: ModelSet | None = None,
) -> dict[str, Any]:
    """One photo: `reconstruct_capture` with a single view."""
    return reconstruct_capture([(filename, data)], options, out_dir, progress, networks=networks)


def reconstruct_capture(
    photos: Sequence[tuple[str, bytes]],
    options: ReconstructOptions,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    networks: ModelSet | None = None,
) -> dict[str, Any]:
    """Decode `photos` (filename, bytes), reconstruct every head, write all artifacts atomically
    into `out_dir`, and return the `result.json` document (also written there, last).

    Several photos form one capture only with `options.subject`; without it, run each photo on its
    own. Raises `HeadforgeError`s."""
    from headforge.pipeline.decode import decode_image

    if not photos:
        raise InvalidOptionError("a capture needs at least one photo")
    if len(photos) > 1 and not options.subject:
        raise InvalidOptionError("several photos form one capture only with subject=true")
    if options.subject:
        check_subject_photo_count(len(photos))
    keep_freed_memory()
    report = progress or (lambda _stage, _fraction: None)
    timer = _Timer()
    started = time.perf_counter()
    pipeline = get_pipeline(options.pipeline)
    require_available(pipeline)
    symmetry = np.asarray(pipeline.symmetry(), dtype=np.int32) if pipeline.symmetry else None
    stages = pipeline.stages
    if options.topology is not None:  # the studio template follows the pipeline's own stages
        from headforge.pipeline.retopology import topology_stage

        stages = (*stages, topology_stage(options.topology, pipeline.name))

    report("decode", 0.0)
    with timer.stage("decode"):
        views = [View(index, name, data, decode_image(data)) for index, (name, data) in enumerate(photos)]
    capture = Capture(views, subject=options.subject)
    report("models", 0.05)
    with timer.stage("models"):
        if networks is None:
            from headforge.models.runtime import load_model_set

            networks = load_model_set()
        networks.preload(pipeline.networks)
        ctx = StageContext(options, networks.used(), capture)

    report(pipeline.heads.name, 0.1)
    heads: list[Head] = []
    with timer.stage(pipeline.heads.name):
        for view in views:
            heads += pipeline.heads.find(ctx, view)
    picks: list[SubjectPick] | None = None
    if capture.subject:  # one head per view: the subject's
        heads, picks = pick_subject_heads(ctx, heads)
    if not heads and not ctx.notes:
        ctx.notes.append("no face found in the image; nothing to reconstruct")
    for position, stage in enumerate(stages):
        if heads:
            report(stage.name, 0.1 + 0.05 * (position + 1) / len(stages))
            with timer.stage(stage.name):
                heads = _run_stage(stage, ctx, heads, len(views) > 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    subject_texture = None
    if capture.subject and len(views) > 1 and heads:  # one texture fused across the subject's photos
        report("texture", 0.15)
        from headforge.pipeline.texturing import fuse_subject

        with timer.stage("texture"):
            subject_texture = fuse_subject(ctx, heads, options.texture_size, symmetry)
    kept, textures, written = _finish_heads(
        ctx, pipeline, heads, symmetry, out_dir, timer, report, subject_texture
    )

    report("result", 0.97)
    with timer.stage("result"):
        remove_stale_artifacts(out_dir, {file.name for file, _, _ in written} | {"result.json"})
        timings = {name: round(value, 3) for name, value in timer.timings_ms.items()}
        timings["total"] = round((time.perf_counter() - started) * 1000.0, 3)
        records = pipeline.models() if pipeline.models else []
        document = build_document(pipeline, ctx, kept, textures, written, timings, records, subject_texture)
        if picks is not None:
            document["subject"] = subject_document(ctx, picks, kept)
        write_atomic(out_dir / "result.json", json_bytes(document))
    report("done", 1.0)
    return document


def _finish_heads(
    ctx: StageContext,
    pipeline: Pipeline,
    heads: list[Head],
    symmetry: NDArray[np.int32] | None,
    out_dir: Path,
    timer: _Timer,
    report: Progress,
    subject_texture: SubjectTexture | None = None,
) -> tuple[list[Head], list[TextureStats | None], list[Written]]:
    """The shared steps per head (texture, splats, package) and the previews; returns the heads
    kept (re-indexed per view), their texture shares (a fused subject head: its own photo's) and
    the files written."""
    options, views = ctx.options, ctx.capture.views
    multiview = len(views) > 1
    kept: list[Head] = []
    textures: list[TextureStats | None] = []
    per_head = 0.75 / max(len(heads), 1)
    # Encoding PNGs and writing files runs on worker threads (zlib and OpenCV release the GIL) while
    # the next head or the preview is computed; the stage timings are each job's own wall time.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="headforge-package") as pool:
        jobs: list[Future[list[Written]]] = []
        for position, head in enumerate(heads):
            base = 0.15 + position * per_head
            shares = None if subject_texture is None else subject_texture.stats_of(head)
            if head.mesh_image is None:  # a head source without meshes (vggheads without FLAME): no files
                head.index = sum(other.view == head.view for other in kept)
                kept.append(head)
                textures.append(None)
                continue
            try:
                if head.texture is None:
                    report("texture", base + 0.25 * per_head)
                    with timer.stage("texture"):
                        from headforge.pipeline.texturing import texture_head

                        shares = texture_head(ctx, head, options.texture_size, symmetry)
                # Start the PNG now: it encodes while splats and the preview are computed.
                texture_png = pool.submit(_encode_texture, head.texture, options.outputs, timer)
                if options.splats > 0 and head.splats is None:
                    report("splats", base + 0.5 * per_head)
                    with timer.stage("splats"):
                        head.splats = _build_splats(head, options.splats, _head_seed(options.seed, head))
            except HeadforgeError as error:
                if _fails_the_capture(error):
                    raise
                ctx.notes.append(f"{_head_name(head, multiview)} skipped: [{error.code}] {error.message}")
                continue
            report("package", base + 0.7 * per_head)
            head.index = sum(other.view == head.view for other in kept)
            kept.append(head)
            textures.append(shares)
            stem = f"v{head.view}_h{head.index}" if multiview else f"h{head.index}"
            jobs.append(pool.submit(_package_head, head, stem, texture_png, out_dir, options.outputs, timer))

        if "preview" in options.outputs:
            report("preview", 0.9)
            from headforge.pipeline.preview import MAX_RENDERED_HEADS, compose_preview

            for view in views:
                with timer.stage("preview"):
                    shown = [head for head in kept if head.view == view.index]
                    if len(shown) > MAX_RENDERED_HEADS:
                        where = f" of view {view.index}" if multiview else ""
                        ctx.notes.append(
                            f"preview.png{where} renders the first {MAX_RENDERED_HEADS} of {len(shown)} heads"
                        )
                    preview = compose_preview(view.rgb, shown)
                name = f"v{view.index}_preview.png" if multiview else "preview.png"
                jobs.append(pool.submit(_write_preview, preview, out_dir / name, view.index, timer))
        written = [item for job in jobs for item in job.result()]
    return kept, textures, written


def _run_stage(stage: Stage, ctx: StageContext, heads: list[Head], multiview: bool) -> list[Head]:
    """Run `stage` on every head at once; when it refuses the batch (a client-side error), run it on
    each head alone and drop, with a note, only the heads it refuses again."""
    try:
        stage.run(ctx, heads)
        return heads
    except HeadforgeError as error:
        if _fails_the_capture(error):
            raise
        if len(heads) == 1:
            ctx.notes.append(f"{_head_name(heads[0], multiview)} skipped: [{error.code}] {error.message}")
            return []
    kept = []
    for head in heads:
        try:
            stage.run(ctx, [head])
        except HeadforgeError as error:
            if _fails_the_capture(error):
                raise
            ctx.notes.append(f"{_head_name(head, multiview)} skipped: [{error.code}] {error.message}")
        else:
            kept.append(head)
    if ctx.capture.subject and kept:  # the views left are one person's: run them together again
        try:
            stage.run(ctx, kept)
        except HeadforgeError as error:
            if _fails_the_capture(error):
                raise
            ctx.subject = None  # each head keeps its own run; no identity is shared
            ctx.notes.append(f"{stage.name}: the views could not be fused: [{error.code}] {error.message}")
    return kept


def _head_name(head: Head, multiview: bool) -> str:
    return f"view {head.view} head {head.index}" if multiview else f"head {head.index}"


def _fails_the_capture(error: HeadforgeError) -> bool:
    """Whether a stage's error stops the whole capture (server-side or unavailable) rather than
    skipping just the head it concerns."""
    return error.http_status >= 500 or isinstance(error, PipelineUnavailableError)


def _encode_texture(
    texture: NDArray[np.uint8] | None, outputs: frozenset[str], timer: _Timer
) -> bytes | None:
    """The texture as PNG bytes, once, for both the GLB and the OBJ (None when neither is wanted)."""
    if texture is None or not outputs & {"glb", "obj"}:
        return None
    with timer.stage("texture_encode"):
        return encode_png(texture)


def _package_head(
    head: Head,
    stem: str,
    texture_png: Future[bytes | None],
    out_dir: Path,
    outputs: frozenset[str],
    timer: _Timer,
) -> list[Written]:
    """Write the head's GLB, OBJ + MTL + PNG and splat PLY (after its PNG job, submitted earlier)."""
    png = texture_png.result()
    with timer.stage("package"):
        files = write_head_files(head.mesh, png, head.splats, stem, out_dir, outputs)
    head.artifacts = {file.kind: file.name for file in files}
    return [(file, head, head.view) for file in files]


def _write_preview(preview: NDArray[np.uint8], path: Path, view: int, timer: _Timer) -> list[Written]:
    with timer.stage("preview_encode"):
        file: WrittenFile = write_atomic(path, encode_png(preview))
        return [(file, None, view)]


def _head_seed(seed: int, head: Head) -> int:
    """A per-head seed derived from the job seed, stable across runs (view 0 keeps the one-photo seeds)."""
    entropy = [seed, head.index] if head.view == 0 else [seed, head.index, head.view]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _build_splats(head: Head, count: int, seed: int) -> Splats:
    from headforge.pipeline.splats import sample_splats

    if head.mesh is None or head.texture is None:
        raise ValueError("splats need head.mesh and head.texture")
    return sample_splats(head.mesh, head.texture, count, seed=seed)
