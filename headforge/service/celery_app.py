"""The Celery application: JSON only, late acks, prefetch 1, time limits, `cpu` and `gpu` queues.

`celery -A headforge.service.celery_app worker -Q cpu` works, and so does `headforge worker`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals
from kombu import Queue

from headforge.service.jobs import JobStore
from headforge.service.settings import QUEUES, WORKER_QUEUES_ENV, Settings

WEBHOOK_TASK = "headforge.deliver_webhook"
JOB_TASK = "headforge.run_job"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings (Redis broker, or the embedded SQLite broker)."""
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("headforge", broker=settings.broker_url, include=["headforge.service.tasks"])
    transport_options: dict[str, object] = {}
    if settings.embedded:
        app.conf.broker_transport = "headforge.service.broker:SqliteTransport"
    else:
        transport_options = {
            # Redis puts an unacknowledged message back after this long: always longer than a job may run.
            "visibility_timeout": settings.effective_visibility_timeout,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "retry_on_timeout": True,
        }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=0,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="cpu",
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        # No remote control: headforge never broadcasts to workers (liveness and leases live in the
        # job store), and the control channel's pub/sub socket is what a worker was seen blocked on
        # after a Redis restart, consuming nothing while jobs sat in its queue (tests/service/test_faults.py).
        worker_enable_remote_control=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0.1,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    return app


app = make_celery(Settings.from_env())


def consumed_queues(celery: Celery) -> tuple[str, ...]:
    """The headforge queues a worker of `celery` consumes, once `-Q` has been applied."""
    selected = celery.amqp.queues.consume_from
    return tuple(name for name in QUEUES if name in selected)


@signals.celeryd_after_setup.connect
def _announce_queues(sender: str, instance: Any, **_kwargs: Any) -> None:
    """Pass the worker's queue selection to its processes through the environment: the sweeper
    (started right after this signal) reads it into `Settings.worker_queues` and registers the
    worker under each queue, which `/metrics` reports as `headforge_queue_workers{queue}`."""
    os.environ[WORKER_QUEUES_ENV] = ",".join(consumed_queues(instance.app))


def dispatch(celery: Celery, jobs: JobStore, job_id: str, queue: str, countdown: float = 0.0) -> None:
    """Publish the job's message and note when, so the sweeper knows it was sent."""
    celery.send_task(JOB_TASK, args=[job_id], queue=queue, countdown=countdown or None)
    jobs.mark_dispatched(job_id)


def publish_webhook(
    celery: Celery, job_id: str, event: str, attempt: int, queue: str, countdown: float = 0.0
) -> None:
    """Publish one delivery attempt of the job's `event` webhook (`tasks.deliver_webhook` claims it)."""
    celery.send_task(WEBHOOK_TASK, args=[job_id, event, attempt], queue=queue, countdown=countdown or None)
