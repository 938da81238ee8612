"""The embedded broker: kombu's SQLAlchemy transport over a local SQLite file, tuned for one machine.

Why this transport (and not kombu's filesystem transport): each publish and each fetch is one SQLite
transaction, so a message that was accepted survives `kill -9` of any process and a power cut
(SQLite's journal), and several processes (the API, the worker's parent and children) can share the
file safely. The filesystem transport renames and deletes message files without a transaction and
has no locking across readers on all platforms.

Neither on-disk transport tracks delivered-but-unacknowledged messages on disk (kombu keeps them in
the worker's memory and puts them back only on a clean shutdown), so `acks_late` alone cannot bring
back a message whose worker was killed. headforge does not rely on it: the job store is the source of
truth, every running job holds a lease that its worker renews, and the sweeper in every worker
publishes a job again when its lease expires or its message has been waiting too long (`jobs.py`,
`tasks.py`). A duplicate delivery is a no-op, so completion stays exactly-once.

Changes to the stock transport: a 0.1 s polling interval (the stock 1 s adds latency to every job),
WAL journaling with a 30 s busy timeout, and fetched rows are deleted instead of being kept forever
with `visible = false`.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import virtual
from kombu.transport.sqlalchemy import Channel as SqlaChannel
from kombu.transport.sqlalchemy import Transport as SqlaTransport
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from sqlalchemy import create_engine, event, text

POLLING_INTERVAL = 0.1


class SqliteChannel(SqlaChannel):
    def _engine_from_config(self) -> Any:
        options = dict(self.connection.client.transport_options)
        for name in (
            "queue_tablename",
            "message_tablename",
            "callback",
            "errback",
            "max_retries",
            "interval_start",
            "interval_step",
            "interval_max",
            "retry_errors",
            "polling_interval",
            "visibility_timeout",
        ):
            options.pop(name, None)
        options.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(self.connection.client.hostname, **options)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine

    def _get(self, queue: str, timeout: Any = None) -> Any:
        queue_row = self._get_or_create(queue)
        self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            message = (
                self.session.query(self.message_cls)
                .filter(self.message_cls.queue_id == queue_row.id)
                .filter(self.message_cls.visible != False)  # noqa: E712 (SQL expression)
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(1)
                .first()
            )
            if message is None:
                raise virtual.Empty()
            payload = message.payload
            self.session.delete(message)
            return loads(bytes_to_str(payload))
        finally:
            self.session.commit()


class SqliteTransport(SqlaTransport):
    Channel = SqliteChannel
    polling_interval = POLLING_INTERVAL
