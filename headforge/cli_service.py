"""`headforge serve`, `headforge worker` and `headforge submit`. Heavy imports stay inside the commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import typer


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    with_worker: bool | None = typer.Option(
        None, "--worker/--no-worker",
        help="Also run a worker process. Default: yes without HEADFORGE_REDIS_URL (embedded mode), no with it.",
    ),
    concurrency: int = typer.Option(1, help="Pool processes of the embedded worker."),
    api_workers: int = typer.Option(1, "--api-workers", help="uvicorn worker processes for the API."),
) -> None:
    """Run the API (and, in embedded mode, one worker on the same machine)."""
    import uvicorn

    from headforge.service.settings import Settings

    settings = Settings.from_env()
    run_worker = settings.embedded if with_worker is None else with_worker
    mode = "embedded (SQLite broker and job store)" if settings.embedded else "Redis"
    typer.echo(f"headforge: {mode}; data in {settings.data_dir}", err=True)
    child: subprocess.Popen[bytes] | None = None
    if run_worker:
        child = subprocess.Popen(
            [sys.executable, "-m", "headforge", "worker", "--concurrency", str(concurrency),
             "--queue", "cpu", "--queue", "gpu"],
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )
        typer.echo(f"headforge: worker started (pid {child.pid})", err=True)
    typer.echo(f"headforge: API on http://{host}:{port} (OpenAPI at /docs)", err=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler that was
    # installed before it started. Make that handler an exit, so the `finally` below stops the worker.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run("headforge.service.app:app_from_env", factory=True, host=host, port=port,
                    workers=api_workers, log_level="warning", access_log=False)
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
    concurrency: int = typer.Option(1, "--concurrency", "-c", help="Pool processes (each loads the models once)."),
    hostname: str | None = typer.Option(None, "--hostname", "-n", help="Worker name (default: headforge@<host>)."),
    loglevel: str = typer.Option("INFO", help="Log level."),
    max_tasks_per_child: int = typer.Option(0, help="Recycle a pool process after this many jobs (0: never)."),
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
        "worker", "--queues", ",".join(dict.fromkeys(queue)), "--concurrency", str(concurrency),
        "--loglevel", loglevel, "--without-gossip", "--without-mingle", "--pool", "prefork",
        "--hostname", hostname or f"headforge-{os.getpid()}@%h",
    ]
    if max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
    app.worker_main(argv)


def submit(
    images: list[Path] = typer.Argument(..., help="Image files to submit (one job each)."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Base URL of a headforge server."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="HEADFORGE_API_KEY", help="API key."),
    wait: bool = typer.Option(False, "--wait", help="Wait for each job and download its artifacts."),
    out: Path = typer.Option(Path("headforge-out"), "-o", "--out", help="Folder for the artifacts."),
    pipeline: str | None = typer.Option(None, help="Pipeline name (default: the server's default)."),
    outputs: str | None = typer.Option(None, help="Comma-separated: glb,obj,splats,preview."),
    timeout: float = typer.Option(900.0, help="Seconds to wait per job."),
) -> None:
    """Submit images to a running server; with --wait, show progress and download the artifacts."""
    from rich.progress import BarColumn, Progress, TaskID, TextColumn

    from headforge.client import HeadforgeClient

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"not a file: {', '.join(missing)}")
    failures = 0
    with HeadforgeClient(server, api_key=api_key) as client:
        submitted = [(path, client.submit([path], pipeline=pipeline, outputs=outputs)) for path in images]
        for path, job in submitted:
            typer.echo(f"{path}: job {job['id']} {job['status']}")
        if not wait:
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}")) as bar:
            tasks = {job["id"]: bar.add_task(path.name, total=1.0, status="queued") for path, job in submitted}
            finished: dict[str, dict[str, object]] = {}
            for _path, job in submitted:

                def update(doc: dict[str, object], task_id: TaskID = tasks[job["id"]]) -> None:
                    progress = doc.get("progress") or {}
                    overall = float(progress.get("overall", 0.0)) if isinstance(progress, dict) else 0.0
                    done = 1.0 if doc["status"] == "succeeded" else overall
                    bar.update(task_id, completed=done, status=str(doc["status"]))

                finished[job["id"]] = client.wait(job["id"], timeout=timeout, on_update=update)
        for path, job in submitted:
            doc = finished[job["id"]]
            if doc["status"] != "succeeded":
                failures += 1
                error = doc.get("error") or {}
                code = error.get("code") if isinstance(error, dict) else None
                typer.secho(f"{path}: {doc['status']} [{code}]", err=True, fg=typer.colors.RED)
                continue
            target = out / path.stem if len(submitted) > 1 else out
            saved = client.download_artifacts(doc, target)
            typer.echo(f"{path}: {len(saved)} files in {target}")
    if failures:
        raise typer.Exit(2)
