"""Artifact storage: uploads (`inputs/`) and job outputs (`jobs/`), addressed by string keys.

`LocalArtifactStore` writes every object to a temporary file beside its destination, fsyncs it and
renames it into place, so a reader (or a worker killed mid-write) never leaves a half-written
object under a real key. `S3ArtifactStore` puts whole objects, which S3 makes visible atomically.
"""

from __future__ import annotations

import mimetypes
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from headforge.errors import NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    from headforge.service.settings import Settings

CHUNK_SIZE = 1024 * 1024

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
    """Objects as files under `root`, written atomically (temp file, fsync, rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def ping(self) -> None:
        if not (self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise ServiceUnavailableError("the artifact directory is not writable", details={"root": str(self.root)})

    def _atomic_write(self, key: str, write: Any) -> None:
        destination = self._path(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.parent / f".tmp-{uuid.uuid4().hex}-{destination.name}"
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
        if base.is_dir():
            shutil.rmtree(base, ignore_errors=True)
        else:
            base.unlink(missing_ok=True)
        return count


class S3ArtifactStore:
    """Objects in an S3-compatible bucket (AWS, MinIO, Ceph) through boto3."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
        client: Any = None,
    ):
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _missing(self, error: Exception) -> bool:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        return str(code) in ("404", "NoSuchKey", "NotFound")

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:
            raise ServiceUnavailableError("the S3 bucket is unreachable", details={"reason": str(error)}) from error

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": media_type_for(key)})

    def adopt_file(self, key: str, path: Path) -> None:
        self.put_file(key, path)

    def adopt_files(self, items: list[tuple[str, Path]]) -> None:
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(items)))) as pool:
            list(pool.map(lambda item: self.put_file(*item), items))

    def scratch_dir(self) -> Path | None:
        return None

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=media_type_for(key))

    def get_bytes(self, key: str) -> bytes:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            return body
        except Exception as error:
            if self._missing(error):
                raise NotFoundError("no such object", details={"key": key}) from None
            raise

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as error:
            if self._missing(error):
                raise NotFoundError("no such object", details={"key": key}) from None
            raise
        chunks: Iterator[bytes] = body.iter_chunks(CHUNK_SIZE)
        return chunks

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as error:
            if self._missing(error):
                return None
            raise

    def local_path(self, key: str) -> Path | None:
        return None

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


def make_store(settings: Settings) -> ArtifactStore:
    """S3 when `HEADFORGE_S3_BUCKET` is set, else the local filesystem under the data directory."""
    if settings.s3_bucket:
        return S3ArtifactStore(
            settings.s3_bucket, settings.s3_prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
        )
    return LocalArtifactStore(settings.artifacts_dir)
