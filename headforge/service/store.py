"""Artifact storage: uploads (`inputs/`) and job outputs (`jobs/`), addressed by string keys.

`LocalArtifactStore` writes every object to a temporary file beside its destination, fsyncs it and
renames it into place, so a reader (or a worker killed mid-write) never leaves a half-written
object under a real key. `S3ArtifactStore` puts whole objects, which S3 makes visible atomically.

Failures that may go away by themselves are raised as `ServiceUnavailableError` (transient: a job
retries with backoff, the API answers 503): S3 connection errors, timeouts, throttling and 5xx
answers, and a full local disk (ENOSPC, EDQUOT). A missing object is `NotFoundError`; every other
error (bad credentials, no such bucket, access denied) passes through unchanged and fails the job.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mimetypes
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from headforge.errors import HeadforgeError, NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    from headforge.service.settings import Settings

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024

# A full disk is worth retrying: an operator can free space (or the TTL sweep does) before the job's
# last attempt. Other OSErrors (EIO, EACCES, EROFS) are faults to fix, so they fail the job.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# S3 error codes that mean "slow down or try again later" (AWS, MinIO and Ceph use these); any 5xx
# or 429 answer counts too, whatever its code.
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
    }
)

# The readiness probe's own client: one try with short timeouts, so /readyz answers in seconds when
# the endpoint is down or silent instead of holding a request through boto3's retries.
PROBE_TIMEOUT_SECONDS = 3.0

MEDIA_TYPES = {
    ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json",
    ".obj": "model/obj",
    ".mtl": "model/mtl",
    ".ply": "application/octet-stream",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".json": "application/json",
    ".zip": "application/zip",
    ".webp": "image/webp",
}


def media_type_for(name: str) -> str:
    """The media type served for an artifact name."""
    suffix = Path(name).suffix.lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _disk_full_is_transient(operation: str, key: str | None = None) -> Iterator[None]:
    """Raise a full disk as `ServiceUnavailableError`; other errors pass through."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        details: dict[str, Any] = {"operation": operation, "error": errno.errorcode[error.errno]}
        if key is not None:
            details["key"] = key
        raise ServiceUnavailableError(
            f"the artifact disk is full: {operation} failed ({os.strerror(error.errno)})", details=details
        ) from error


def store_os_error(error: OSError, operation: str, key: str | None = None) -> ServiceUnavailableError:
    """The gateway's answer to a local disk that refuses `operation` (read-only, full, broken): 503
    `service_unavailable`, naming the errno but no path."""
    name = errno.errorcode.get(error.errno or 0, type(error).__name__)
    details: dict[str, Any] = {"operation": operation, "error": name}
    if key is not None:
        details["key"] = key
    return ServiceUnavailableError(
        f"the artifact store cannot {operation} now ({error.strerror or name})", details=details
    )


def _raise_unless_missing(_function: Any, _path: str, exc_info: Any) -> None:
    """`shutil.rmtree`'s error handler: something removed concurrently is fine, anything else raises."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


# Public name for the workers: a job whose own writes (scratch files, outputs) fill the disk is
# retried with backoff like a store write that does.
disk_full_is_transient = _disk_full_is_transient


def _s3_transient_cause(error: BaseException) -> BaseException | None:
    """The error that makes a failed S3 call worth retrying (a connection failure or timeout, or a
    throttling or 5xx answer): `error` itself or one it wraps. None when the failure is permanent.

    Only explicit wrapping is followed (`raise ... from`, and boto3's `S3UploadFailedError`, raised
    inside `except ClientError`), never an unrelated error that was being handled at the time: a 403
    met while cleaning up after an outage stays a 403."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        from boto3.exceptions import S3UploadFailedError

        wrappers: tuple[type[BaseException], ...] = (S3UploadFailedError,)
    except ImportError:  # a client from elsewhere (botocore only)
        wrappers = ()
    network = (HTTPClientError, BotoConnectionError, IncompleteReadError, ConnectionError, TimeoutError)
    current: BaseException | None = error
    for _depth in range(8):
        if current is None:
            return None
        if isinstance(current, network):
            return current
        if isinstance(current, ClientError):
            code, status = _s3_code(current)
            if code in TRANSIENT_S3_CODES or (
                status is not None and status != 501 and (status >= 500 or status == 429)
            ):
                return current
        wrapped = current.__context__ if isinstance(current, wrappers) else None
        current = current.__cause__ or wrapped
    return None


def _s3_code(error: BaseException) -> tuple[str, int | None]:
    """The error code and HTTP status of a botocore `ClientError` ("" and None when absent)."""
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, int(status) if status is not None else None


def _check_key(key: str) -> str:
    """Keys are relative POSIX paths without `..`, so no key can escape the store's root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise NotFoundError("no such object", details={"key": key})
    return key


class ArtifactStore(Protocol):
    def ping(self) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def adopt_file(self, key: str, path: Path) -> None: ...
    def adopt_files(self, items: list[tuple[str, Path]]) -> None: ...
    def scratch_dir(self) -> Path | None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...
    def size(self, key: str) -> int | None: ...
    def local_path(self, key: str) -> Path | None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...


class LocalArtifactStore:
    """Objects as files under `root`, written atomically (temp file, fsync, rename).

    `ping` (readiness) fails when the directory cannot take a write now: not writable, fewer than
    `min_free_bytes` free (one upload's worth by default, `make_store`), or a probe write refused."""

    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def ping(self) -> None:
        if not (self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise ServiceUnavailableError(
                "the artifact directory is not writable", details={"root": str(self.root)}
            )
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        if free < self.min_free_bytes:
            raise ServiceUnavailableError(
                f"the artifact disk is full: {free} bytes free, under the {self.min_free_bytes} one upload needs",
                details={"root": str(self.root), "free_bytes": free, "min_free_bytes": self.min_free_bytes},
            )
        probe = self.root / f".tmp-probe-{uuid.uuid4().hex}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ready")
        except OSError as error:
            raise ServiceUnavailableError(
                f"the artifact directory cannot take writes ({error.strerror})",
                details={"root": str(self.root), "error": errno.errorcode.get(error.errno or 0, "OSError")},
            ) from error
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)

    def _atomic_write(self, key: str, write: Any) -> None:
        destination = self._path(key)
        temporary = destination.parent / f".tmp-{uuid.uuid4().hex}-{destination.name}"
        with _disk_full_is_transient("write", key):
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(temporary, "wb") as handle:
                    write(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, destination)
            finally:
                temporary.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        def copy(handle: Any) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, handle, CHUNK_SIZE)

        self._atomic_write(key, copy)

    def adopt_file(self, key: str, path: Path) -> None:
        self.adopt_files([(key, path)])

    def adopt_files(self, items: list[tuple[str, Path]]) -> None:
        """Move finished files into the store: fsync them all (in parallel, so the disk commits them
        together), then rename each into place (no copy when on the same disk), then fsync the folders."""
        with _disk_full_is_transient("adopt"):
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(items)))) as pool:
                list(pool.map(_fsync_path, [path for _key, path in items]))
            folders = set()
            for key, path in items:
                destination = self._path(key)
                destination.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(path, destination)
                except OSError:  # another filesystem: copy atomically instead
                    self.put_file(key, path)
                folders.add(destination.parent)
            for folder in folders:
                _fsync_path(folder)

    def scratch_dir(self) -> Path | None:
        """Work folders on the store's own disk, so finished files can be renamed into place."""
        scratch = self.root / ".scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda handle: handle.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError("no such object", details={"key": key}) from None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError("no such object", details={"key": key})

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while block := handle.read(CHUNK_SIZE):
                    yield block

        return chunks()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotFoundError):
            return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)).replace(os.sep, "/")
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-") and ".scratch" not in p.parts
        )

    def delete_prefix(self, prefix: str) -> int:
        _check_key(prefix.rstrip("/"))
        base = self.root / prefix.rstrip("/")
        if not base.exists():
            return 0
        count = sum(1 for p in base.rglob("*") if p.is_file()) if base.is_dir() else 1
        # Errors raise (a read-only disk): the caller keeps the job's record until the files are gone.
        if base.is_dir():
            shutil.rmtree(base, onerror=_raise_unless_missing)
        else:
            base.unlink(missing_ok=True)
        return count


class S3ArtifactStore:
    """Objects in an S3-compatible bucket (AWS, MinIO, Ceph) through boto3.

    Every call goes through `_call`, which turns a missing object into `NotFoundError` (where the
    caller asks for that) and a transient failure into `ServiceUnavailableError`. Retries inside one
    call are boto3's (its `AWS_RETRY_MODE` and `AWS_MAX_ATTEMPTS` settings apply); the job's own
    retries with backoff come on top."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        probe_client: Any = None,
    ):
        if client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint_url, region_name=region)
            probe_client = probe_client or session.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    connect_timeout=PROBE_TIMEOUT_SECONDS,
                    read_timeout=PROBE_TIMEOUT_SECONDS,
                    retries={"total_max_attempts": 1},
                ),
            )
        self.client = client
        self.probe_client = probe_client or client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _missing(self, error: Exception) -> bool:
        """Whether S3 answered that the object does not exist (connection errors carry no answer)."""
        return _s3_code(error)[0] in ("404", "NoSuchKey", "NotFound")

    @contextlib.contextmanager
    def _call(self, operation: str, key: str | None = None, *, not_found: bool = False) -> Iterator[None]:
        """Translate what one S3 call raises: a missing object to `NotFoundError` (when `not_found`),
        a transient failure to `ServiceUnavailableError`; anything else passes through."""
        try:
            yield
        except HeadforgeError:
            raise
        except Exception as error:
            if not_found and self._missing(error):
                raise NotFoundError("no such object", details={"key": key}) from None
            cause = _s3_transient_cause(error)
            if cause is None:
                raise
            raise self._unavailable(operation, key, cause) from error

    def _unavailable(self, operation: str, key: str | None, cause: BaseException) -> ServiceUnavailableError:
        """The error for a transient failure: the operation, bucket, key and the S3 code or exception
        class. boto3's own text (it names the endpoint URL) is logged, not returned."""
        details: dict[str, Any] = {
            "operation": operation,
            "bucket": self.bucket,
            "error": type(cause).__name__,
        }
        if key is not None:
            details["key"] = key
        code, status = _s3_code(cause)
        if code:
            details["code"] = code
        if status is not None:
            details["http_status"] = status
        # botocore's own text names the endpoint URL and key layout: logs only, never the client.
        log.warning("S3 %s on bucket %r failed: %s", operation, self.bucket, str(cause)[:300])
        reason = code or type(cause).__name__
        return ServiceUnavailableError(
            f"the S3 artifact store is unavailable: {operation} on bucket {self.bucket!r} failed ({reason})",
            details=details,
        )

    def ping(self) -> None:
        try:
            with self._call("head_bucket"):
                self.probe_client.head_bucket(Bucket=self.bucket)
        except ServiceUnavailableError:
            raise
        except Exception as error:  # no such bucket, access denied, no credentials: not ready either
            raise ServiceUnavailableError(
                f"the S3 bucket {self.bucket!r} cannot be used: {str(error)[:300]}",
                details={"operation": "head_bucket", "bucket": self.bucket, "error": type(error).__name__},
            ) from error

    def put_file(self, key: str, path: Path) -> None:
        with self._call("upload_file", key):
            self.client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": media_type_for(key)}
            )

    def adopt_file(self, key: str, path: Path) -> None:
        self.put_file(key, path)

    def adopt_files(self, items: list[tuple[str, Path]]) -> None:
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(items)))) as pool:
            list(pool.map(lambda item: self.put_file(*item), items))

    def scratch_dir(self) -> Path | None:
        return None

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._call("put_object", key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=media_type_for(key)
            )

    def get_bytes(self, key: str) -> bytes:
        with self._call("get_object", key, not_found=True):
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            return body

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with self._call("get_object", key, not_found=True):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                with self._call("get_object", key):
                    yield from body.iter_chunks(CHUNK_SIZE)
            finally:
                body.close()

        return chunks()

    def size(self, key: str) -> int | None:
        try:
            with self._call("head_object", key, not_found=True):
                return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except NotFoundError:
            return None

    def local_path(self, key: str) -> Path | None:
        return None

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with self._call("list_objects_v2", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        with self._call("delete_objects", prefix):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


def make_store(settings: Settings) -> ArtifactStore:
    """S3 when `HEADFORGE_S3_BUCKET` is set, else the local filesystem under the data directory."""
    if settings.s3_bucket:
        return S3ArtifactStore(
            settings.s3_bucket,
            settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    return LocalArtifactStore(settings.artifacts_dir, min_free_bytes=settings.max_upload_bytes)
