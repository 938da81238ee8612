"""`headforge serve`, `headforge worker` and `headforge submit`. Heavy imports stay inside the commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from headforge.client import HeadforgeClient


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    with_worker: bool | None = typer.Option(
        None,
        "--worker/--no-worker",
        help="Also run a worker process. Default: yes without HEADFORGE_REDIS_URL (embedded mode), no with it.",
    ),
    concurrency: int = typer.Option(1, help="Pool processes of the embedded worker."),
    api_workers: int = typer.Option(1, "--api-workers", help="uvicorn worker processes for the API."),
) -> None:
    """Run the API (and, in embedded mode, one worker on the same machine)."""
    from headforge.service.server import run_api
    from headforge.service.settings import Settings

    settings = Settings.from_env()
    run_worker = settings.embedded if with_worker is None else with_worker
    mode = "embedded (SQLite broker and job store)" if settings.embedded else "Redis"
    typer.echo(f"headforge: {mode}; data in {settings.data_dir}", err=True)
    child: subprocess.Popen[bytes] | None = None
    if run_worker:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "headforge",
                "worker",
                "--concurrency",
                str(concurrency),
                "--queue",
                "cpu",
                "--queue",
                "gpu",
            ],
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )
        typer.echo(f"headforge: worker started (pid {child.pid})", err=True)
    typer.echo(f"headforge: API on http://{host}:{port} (OpenAPI at /docs)", err=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler that was
    # installed before it started. Make that handler an exit, so the `finally` below stops the worker.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        run_api(host, port, api_workers)
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _terminate_with_parent() -> None:
    """In the embedded worker: ask Linux to send SIGTERM if `headforge serve` dies, even by kill -9."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def worker(
    queue: list[str] = typer.Option(["cpu"], "--queue", "-Q", help="Queue(s) to consume: cpu, gpu."),
    concurrency: int = typer.Option(
        1, "--concurrency", "-c", help="Pool processes (each loads the models once)."
    ),
    hostname: str | None = typer.Option(
        None, "--hostname", "-n", help="Worker name (default: headforge@<host>)."
    ),
    loglevel: str = typer.Option("INFO", help="Log level."),
    max_tasks_per_child: int = typer.Option(
        0, help="Recycle a pool process after this many jobs (0: never)."
    ),
) -> None:
    """Run a Celery worker on the configured broker."""
    from headforge.observability import configure_logging
    from headforge.service.celery_app import app
    from headforge.service.settings import QUEUES, Settings

    unknown = sorted(set(queue) - set(QUEUES))
    if unknown:
        raise typer.BadParameter(f"unknown queue(s) {unknown}; choose among {list(QUEUES)}")
    configure_logging(json_logs=Settings.from_env().json_logs, level=loglevel)
    import headforge.service.tasks  # noqa: F401  (registers the tasks and the sweeper)

    argv = [
        "worker",
        "--queues",
        ",".join(dict.fromkeys(queue)),
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--pool",
        "prefork",
        "--hostname",
        hostname or f"headforge-{os.getpid()}@%h",
    ]
    if max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
    app.worker_main(argv)


# Gateway answers that concern one uploaded file: report them against the file and go on with the others.
# Any other error (bad key, bad option, rate limit, server down) applies to every file and stops the command.
_FILE_REJECTIONS = frozenset(
    {
        "empty_file",
        "truncated_image",
        "corrupt_image",
        "unreadable_file",
        "not_an_image",
        "file_too_large",
        "too_many_pixels",
        "invalid_image",
        "bad_request",
    }
)


def submit(
    images: list[Path] = typer.Argument(..., help="Image files to submit (one job each)."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Base URL of a headforge server."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="HEADFORGE_API_KEY", help="API key."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the jobs and download their artifacts."),
    out: Path = typer.Option(Path("headforge-out"), "-o", "--out", help="Folder for the artifacts."),
    pipeline: str | None = typer.Option(None, help="Pipeline name (default: the server's default)."),
    outputs: str | None = typer.Option(None, help="Comma-separated: glb,obj,splats,preview."),
    timeout: float = typer.Option(
        900.0,
        help="Give up waiting when no job has finished for this many seconds (so each job in a queue "
        "gets this long).",
    ),
) -> None:
    """Submit images to a running server; with --wait, show every job's progress and download the artifacts."""
    import httpx

    from headforge.client import ApiError, HeadforgeClient, WaitTimeout

    missing = [path for path in images if not path.is_file()]
    for path in missing:
        typer.secho(f"{path}: not a file", err=True, fg=typer.colors.RED)
    if missing:
        raise typer.Exit(2)
    labels = _unique_labels(images)
    failures = 0
    try:
        with HeadforgeClient(server, api_key=api_key) as client:
            submitted: list[tuple[Path, str, str]] = []  # (path, label, job id)
            for path, label in zip(images, labels, strict=True):
                try:
                    job = client.submit([path], pipeline=pipeline, outputs=outputs)
                except ApiError as error:
                    if error.code not in _FILE_REJECTIONS:
                        raise
                    failures += 1
                    typer.secho(
                        f"{path}: rejected [{error.code}]: {error.message}", err=True, fg=typer.colors.RED
                    )
                    continue
                submitted.append((path, label, job["id"]))
                typer.echo(f"{path}: job {job['id']} {job['status']}")
            if not wait or not submitted:
                raise typer.Exit(2 if failures else 0)
            names = {job_id: label for _path, label, job_id in submitted}
            try:
                finished = _wait_with_progress(client, names, timeout)
            except WaitTimeout as stalled:
                finished = stalled.jobs
                typer.secho(f"gave up: {stalled}", err=True, fg=typer.colors.RED)
            for path, label, job_id in submitted:
                doc = finished[job_id]
                if doc["status"] != "succeeded":
                    failures += 1
                    problem = doc.get("error")
                    detail = (
                        f" [{problem.get('code')}]: {problem.get('message')}"
                        if isinstance(problem, dict)
                        else ""
                    )
                    typer.secho(f"{path}: {doc['status']}{detail}", err=True, fg=typer.colors.RED)
                    continue
                target = out / label if len(submitted) > 1 else out
                saved = client.download_artifacts(doc, target)
                typer.echo(f"{path}: {len(saved)} files in {target}")
    except httpx.HTTPError as error:
        typer.secho(f"error: cannot talk to {server}: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    if failures:
        raise typer.Exit(2)


def _unique_labels(paths: list[Path]) -> list[str]:
    """A display name and download folder per image: its stem, or `stem-2`, `stem-3`… when taken."""
    labels: list[str] = []
    for path in paths:
        stem = path.stem or "image"
        label, number = stem, 1
        while label in labels:
            number += 1
            label = f"{stem}-{number}"
        labels.append(label)
    return labels


def _progress_text(doc: dict[str, Any]) -> tuple[str, float]:
    """A job's status line (with its place in the queue while queued) and its completed fraction."""
    progress = doc.get("progress") or {}
    overall = float(progress.get("overall", 0.0)) if isinstance(progress, dict) else 0.0
    done = 1.0 if doc["status"] == "succeeded" else min(max(overall, 0.0), 1.0)
    status = str(doc["status"])
    if status == "queued" and doc.get("queue_position") is not None:
        status += f" ({doc['queue_position']} ahead)"
    return status, done


def _wait_with_progress(
    client: HeadforgeClient, names: dict[str, str], timeout: float
) -> dict[str, dict[str, Any]]:
    """Poll all jobs together (`HeadforgeClient.wait_many`). On a terminal: one live bar per job.
    Otherwise (a pipe, a log): a line `[label] status NN%` whenever a job's status or tenth changes."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console()
    if console.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        ) as bars:
            tasks = {
                job_id: bars.add_task(label, total=1.0, status="submitted") for job_id, label in names.items()
            }

            def draw(doc: dict[str, Any]) -> None:
                status, done = _progress_text(doc)
                bars.update(tasks[doc["id"]], completed=done, status=status)

            return client.wait_many(list(names), timeout=timeout, on_update=draw)

    shown: dict[str, tuple[str, int]] = {}

    def log(doc: dict[str, Any]) -> None:
        status, done = _progress_text(doc)
        key = (status, int(done * 10))
        if shown.get(doc["id"]) != key:
            shown[doc["id"]] = key
            typer.echo(f"[{names[doc['id']]}] {status} {round(done * 100)}%")

    return client.wait_many(list(names), timeout=timeout, on_update=log)
