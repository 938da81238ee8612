"""Shared state for the gateway and the workers: JSON documents with atomic read-modify-write,
sorted-set indexes derived from the documents, small expiring values, counters and a token bucket.

Two backends implement the same `StateBackend` protocol:

* `RedisState`: documents as JSON strings, indexes as sorted sets, updates under WATCH/MULTI.
  Used whenever `HEADFORGE_REDIS_URL` is set (compose, Kubernetes).
* `SqliteState`: one SQLite file in WAL mode, updates inside `BEGIN IMMEDIATE`. The embedded default.

Every transition rule lives in `jobs.py` and is written once, as a function from the current
document to the next; the backends only guarantee that the function runs atomically.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from headforge.errors import ServiceUnavailableError

Document = dict[str, Any]
Indexer = Callable[[str, Document], dict[str, float]]
Mutator = Callable[[Document | None], Document | None]


class Unchanged:
    """Returned by a mutator to leave the document as it is."""


UNCHANGED: Any = Unchanged()
DELETE: Any = None


class StateBackend(Protocol):
    def ping(self) -> None: ...
    def get(self, kind: str, doc_id: str) -> Document | None: ...
    def get_many(self, kind: str, doc_ids: list[str]) -> list[Document | None]: ...
    def mutate(self, kind: str, doc_id: str, mutator: Mutator) -> tuple[Document | None, Document | None]: ...
    def rank(self, index: str, member: str) -> int | None: ...
    def count(self, index: str, min_score: float = -math.inf, max_score: float = math.inf) -> int: ...
    def members(
        self,
        index: str,
        min_score: float = -math.inf,
        max_score: float = math.inf,
        limit: int = 1000,
        descending: bool = False,
    ) -> list[str]: ...
    def index_names(self, prefix: str) -> list[str]: ...
    def set_if_absent(self, key: str, value: str, ttl: float) -> str | None: ...
    def set_value(self, key: str, value: str, ttl: float) -> None: ...
    def get_value(self, key: str) -> str | None: ...
    def delete_value(self, key: str) -> None: ...
    def index_add(self, index: str, member: str, score: float) -> None: ...
    def index_remove(self, index: str, member: str) -> None: ...
    def incr(self, name: str, amounts: dict[str, float]) -> None: ...
    def counters(self, name: str) -> dict[str, float]: ...
    def take_token(self, key: str, rate_per_second: float, burst: int) -> float: ...
    def notify(self, topic: str) -> None: ...
    def close(self) -> None: ...


def _index_diff(
    indexer: Indexer | None, kind: str, old: Document | None, new: Document | None
) -> tuple[dict[str, float], list[str]]:
    """Index entries to write and index names to leave, going from `old` to `new`."""
    if indexer is None:
        return {}, []
    before = indexer(kind, old) if old is not None else {}
    after = indexer(kind, new) if new is not None else {}
    stale = [name for name in before if name not in after]
    changed = {name: score for name, score in after.items() if before.get(name) != score}
    return changed, stale


# ----------------------------------------------------------------------------- Redis


_TOKEN_BUCKET_LUA = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', key, math.ceil(burst / rate) + 60)
return tostring(wait)
"""


class RedisState:
    """`StateBackend` on Redis. Calls retry on connection errors for `retry_seconds`, then raise
    `ServiceUnavailableError` (workers ride out a Redis restart; the gateway answers 503 sooner)."""

    def __init__(
        self, url: str, indexer: Indexer | None = None, retry_seconds: float = 3.0, prefix: str = "hf"
    ):
        import redis

        self._redis_module = redis
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=10
        )
        self.indexer = indexer
        self.retry_seconds = retry_seconds
        self.prefix = prefix
        self._bucket = self.client.register_script(_TOKEN_BUCKET_LUA)

    def _doc_key(self, kind: str, doc_id: str) -> str:
        return f"{self.prefix}:{kind}:{doc_id}"

    def _ix(self, index: str) -> str:
        return f"{self.prefix}:ix:{index}"

    def _kv(self, key: str) -> str:
        return f"{self.prefix}:kv:{key}"

    def _call(self, operation: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                return operation()
            except (self._redis_module.ConnectionError, self._redis_module.TimeoutError) as error:
                if time.monotonic() >= deadline:
                    raise ServiceUnavailableError(
                        "the job store (Redis) is unreachable", details={"reason": str(error)}
                    ) from error
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except self._redis_module.exceptions.BusyLoadingError:
                if time.monotonic() >= deadline:
                    raise ServiceUnavailableError("the job store (Redis) is loading its data") from None
                time.sleep(0.2)

    def ping(self) -> None:
        self._call(self.client.ping)

    def get(self, kind: str, doc_id: str) -> Document | None:
        raw = self._call(lambda: self.client.get(self._doc_key(kind, doc_id)))
        return json.loads(raw) if raw else None

    def get_many(self, kind: str, doc_ids: list[str]) -> list[Document | None]:
        if not doc_ids:
            return []
        raws = self._call(lambda: self.client.mget([self._doc_key(kind, i) for i in doc_ids]))
        return [json.loads(raw) if raw else None for raw in raws]

    def mutate(self, kind: str, doc_id: str, mutator: Mutator) -> tuple[Document | None, Document | None]:
        key = self._doc_key(kind, doc_id)

        def attempt() -> tuple[Document | None, Document | None]:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        old = json.loads(raw) if raw else None
                        new = mutator(json.loads(raw) if raw else None)
                        if new is UNCHANGED:
                            pipe.unwatch()
                            return old, old
                        changed, stale = _index_diff(self.indexer, kind, old, new)
                        pipe.multi()
                        if new is None:
                            pipe.delete(key)
                        else:
                            pipe.set(key, json.dumps(new, separators=(",", ":")))
                        for name in stale:
                            pipe.zrem(self._ix(name), doc_id)
                        for name, score in changed.items():
                            pipe.zadd(self._ix(name), {doc_id: score})
                        pipe.execute()
                        return old, new
                    except self._redis_module.WatchError:
                        continue

        result: tuple[Document | None, Document | None] = self._call(attempt)
        return result

    def rank(self, index: str, member: str) -> int | None:
        value = self._call(lambda: self.client.zrank(self._ix(index), member))
        return None if value is None else int(value)

    def count(self, index: str, min_score: float = -math.inf, max_score: float = math.inf) -> int:
        low = "-inf" if min_score == -math.inf else min_score
        high = "+inf" if max_score == math.inf else max_score
        return int(self._call(lambda: self.client.zcount(self._ix(index), low, high)))

    def members(
        self,
        index: str,
        min_score: float = -math.inf,
        max_score: float = math.inf,
        limit: int = 1000,
        descending: bool = False,
    ) -> list[str]:
        low = "-inf" if min_score == -math.inf else min_score
        high = "+inf" if max_score == math.inf else max_score
        if descending:
            raw = self._call(
                lambda: self.client.zrevrangebyscore(self._ix(index), high, low, start=0, num=limit)
            )
        else:
            raw = self._call(
                lambda: self.client.zrangebyscore(self._ix(index), low, high, start=0, num=limit)
            )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in raw]

    def index_names(self, prefix: str) -> list[str]:
        pattern = self._ix(prefix) + "*"
        keys = self._call(lambda: list(self.client.scan_iter(match=pattern, count=500)))
        strip = len(self._ix(""))
        return sorted(k.decode()[strip:] for k in keys)

    def set_if_absent(self, key: str, value: str, ttl: float) -> str | None:
        def attempt() -> str | None:
            if self.client.set(self._kv(key), value, nx=True, px=int(ttl * 1000)):
                return None
            existing: Any = self.client.get(self._kv(key))
            return None if existing is None else _text(existing)

        result: str | None = self._call(attempt)
        return result

    def set_value(self, key: str, value: str, ttl: float) -> None:
        self._call(lambda: self.client.set(self._kv(key), value, px=int(ttl * 1000)))

    def get_value(self, key: str) -> str | None:
        raw = self._call(lambda: self.client.get(self._kv(key)))
        return None if raw is None else _text(raw)

    def delete_value(self, key: str) -> None:
        self._call(lambda: self.client.delete(self._kv(key)))

    def index_add(self, index: str, member: str, score: float) -> None:
        self._call(lambda: self.client.zadd(self._ix(index), {member: score}))

    def index_remove(self, index: str, member: str) -> None:
        self._call(lambda: self.client.zrem(self._ix(index), member))

    def incr(self, name: str, amounts: dict[str, float]) -> None:
        def attempt() -> None:
            with self.client.pipeline(transaction=True) as pipe:
                for field_name, amount in amounts.items():
                    pipe.hincrbyfloat(f"{self.prefix}:ct:{name}", field_name, amount)
                pipe.execute()

        self._call(attempt)

    def counters(self, name: str) -> dict[str, float]:
        raw = self._call(lambda: self.client.hgetall(f"{self.prefix}:ct:{name}"))
        return {k.decode(): float(v) for k, v in raw.items()}

    def take_token(self, key: str, rate_per_second: float, burst: int) -> float:
        wait = self._call(
            lambda: self._bucket(keys=[self._kv("bucket:" + key)], args=[rate_per_second, burst, time.time()])
        )
        return float(wait)

    def channel(self, topic: str) -> str:
        return f"{self.prefix}:notify:{topic}"

    def notify(self, topic: str) -> None:
        """Wake gateway requests waiting on `topic` (pub/sub; best effort, waiters also poll)."""
        self._call(lambda: self.client.publish(self.channel(topic), "1"))

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------- SQLite


_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS idx (name TEXT NOT NULL, member TEXT NOT NULL, score REAL NOT NULL,
                                PRIMARY KEY (name, member));
CREATE INDEX IF NOT EXISTS idx_by_score ON idx (name, score, member);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT NOT NULL, field TEXT NOT NULL, value REAL NOT NULL,
                                     PRIMARY KEY (name, field));
"""


class SqliteState:
    """`StateBackend` on one SQLite file, safe across processes (WAL, BEGIN IMMEDIATE)."""

    def __init__(self, path: Path, indexer: Indexer | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.indexer = indexer
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # idempotent; executescript manages its own transaction

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():  # never reuse across fork
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            self._local.pid = os.getpid()
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def ping(self) -> None:
        self._connection().execute("SELECT 1").fetchone()

    def get(self, kind: str, doc_id: str) -> Document | None:
        row = (
            self._connection()
            .execute("SELECT body FROM docs WHERE kind = ? AND id = ?", (kind, doc_id))
            .fetchone()
        )
        return json.loads(row[0]) if row else None

    def get_many(self, kind: str, doc_ids: list[str]) -> list[Document | None]:
        return [self.get(kind, doc_id) for doc_id in doc_ids]

    def mutate(self, kind: str, doc_id: str, mutator: Mutator) -> tuple[Document | None, Document | None]:
        with self._transaction() as db:
            row = db.execute("SELECT body FROM docs WHERE kind = ? AND id = ?", (kind, doc_id)).fetchone()
            old = json.loads(row[0]) if row else None
            new = mutator(json.loads(row[0]) if row else None)
            if new is UNCHANGED:
                return old, old
            changed, stale = _index_diff(self.indexer, kind, old, new)
            if new is None:
                db.execute("DELETE FROM docs WHERE kind = ? AND id = ?", (kind, doc_id))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO docs (kind, id, body) VALUES (?, ?, ?)",
                    (kind, doc_id, json.dumps(new, separators=(",", ":"))),
                )
            for name in stale:
                db.execute("DELETE FROM idx WHERE name = ? AND member = ?", (name, doc_id))
            for name, score in changed.items():
                db.execute(
                    "INSERT OR REPLACE INTO idx (name, member, score) VALUES (?, ?, ?)", (name, doc_id, score)
                )
            return old, new

    def rank(self, index: str, member: str) -> int | None:
        db = self._connection()
        row = db.execute("SELECT score FROM idx WHERE name = ? AND member = ?", (index, member)).fetchone()
        if row is None:
            return None
        (count,) = db.execute(
            "SELECT COUNT(*) FROM idx WHERE name = ? AND (score < ? OR (score = ? AND member < ?))",
            (index, row[0], row[0], member),
        ).fetchone()
        return int(count)

    def count(self, index: str, min_score: float = -math.inf, max_score: float = math.inf) -> int:
        (count,) = (
            self._connection()
            .execute(
                "SELECT COUNT(*) FROM idx WHERE name = ? AND score >= ? AND score <= ?",
                (index, _finite(min_score), _finite(max_score)),
            )
            .fetchone()
        )
        return int(count)

    def members(
        self,
        index: str,
        min_score: float = -math.inf,
        max_score: float = math.inf,
        limit: int = 1000,
        descending: bool = False,
    ) -> list[str]:
        order = "DESC" if descending else "ASC"
        rows = (
            self._connection()
            .execute(
                f"SELECT member FROM idx WHERE name = ? AND score >= ? AND score <= ? "
                f"ORDER BY score {order}, member {order} LIMIT ?",
                (index, _finite(min_score), _finite(max_score), limit),
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    def index_names(self, prefix: str) -> list[str]:
        rows = (
            self._connection()
            .execute("SELECT DISTINCT name FROM idx WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
            .fetchall()
        )
        return sorted(r[0] for r in rows)

    def set_if_absent(self, key: str, value: str, ttl: float) -> str | None:
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
            if row is not None and row[1] > now:
                return str(row[0])
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)", (key, value, now + ttl)
            )
            return None

    def set_value(self, key: str, value: str, ttl: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                (key, value, time.time() + ttl),
            )

    def get_value(self, key: str) -> str | None:
        row = (
            self._connection()
            .execute("SELECT value FROM kv WHERE key = ? AND expires > ?", (key, time.time()))
            .fetchone()
        )
        return str(row[0]) if row else None

    def delete_value(self, key: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def index_add(self, index: str, member: str, score: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO idx (name, member, score) VALUES (?, ?, ?)", (index, member, score)
            )

    def index_remove(self, index: str, member: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM idx WHERE name = ? AND member = ?", (index, member))

    def incr(self, name: str, amounts: dict[str, float]) -> None:
        with self._transaction() as db:
            for field_name, amount in amounts.items():
                db.execute(
                    "INSERT INTO counters (name, field, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (name, field) DO UPDATE SET value = value + excluded.value",
                    (name, field_name, amount),
                )

    def counters(self, name: str) -> dict[str, float]:
        rows = (
            self._connection().execute("SELECT field, value FROM counters WHERE name = ?", (name,)).fetchall()
        )
        return {str(r[0]): float(r[1]) for r in rows}

    def take_token(self, key: str, rate_per_second: float, burst: int) -> float:
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", ("bucket:" + key,)).fetchone()
            tokens, at = json.loads(row[0]) if row else (float(burst), now)
            tokens = min(float(burst), tokens + (now - at) * rate_per_second)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / rate_per_second
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                ("bucket:" + key, json.dumps([tokens, now]), now + burst / rate_per_second + 60),
            )
            return wait

    def notify(self, topic: str) -> None:
        """No push channel in SQLite: waiters poll."""

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _finite(value: float) -> float:
    return max(min(value, 1e300), -1e300)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
