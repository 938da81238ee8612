"""Uploads as the gateway takes them: image files and zips read under limits, check-decoded and
fingerprinted for idempotency. Plain functions over bytes and `Settings`; no request state."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from fastapi import UploadFile

from headforge.errors import (
    EmptyFileError,
    FileTooLargeError,
    HeadforgeError,
    InvalidOptionError,
    NotAnImageError,
    PipelineUnavailableError,
    TooManyFilesError,
)
from headforge.service.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# A zip entry over 1 MiB that expands more than this many times its stored size is refused before
# it is extracted: photos are compressed already, so only a bomb (or a huge flat bitmap) gets there.
MAX_ZIP_RATIO = 100
ZIP_RATIO_MIN_BYTES = 1024 * 1024
# An archive may hold this many times `max_files_per_batch` entries of any kind (folders, skipped
# files); the count its end record declares is checked before its central directory is parsed.
ZIP_MAX_ENTRIES_FACTOR = 10
ZIP_EOCD_SEARCH = 65535  # the longest archive comment: the end record lies within this of the end
ZIP_READ_BLOCK = 1024 * 1024


@dataclass
class Upload:
    filename: str
    data: bytes


def safe_filename(name: str | None, index: int) -> str:
    base = PurePosixPath((name or "").replace("\\", "/")).name
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return cleaned or f"image{index}"


def validate_options(values: dict[str, Any]) -> dict[str, Any]:
    """Check options exactly as the worker will read them; return their normalized form."""
    from headforge.pipeline.run import ReconstructOptions, pipeline_missing_reason

    options = ReconstructOptions.from_dict(values)
    reason = pipeline_missing_reason(options.pipeline)
    if reason is not None:
        raise PipelineUnavailableError(
            f"pipeline {options.pipeline!r} is not available on this server: {reason}",
            details={"pipeline": options.pipeline, "reason": reason},
        )
    if options.topology is not None:  # unknown_template / template_landmarks_missing at submission
        from headforge.pipeline.retopology import topology_stage

        topology_stage(options.topology, options.pipeline)
    return options.to_dict()


def validate_image(
    upload: Upload, settings: Settings, gate: threading.Semaphore | None = None
) -> dict[str, Any]:
    """Size limits, then the gateway's check decode (`verify_image`: every byte decoded, in the file's
    own pixel mode, JPEGs at 1/8 scale), so truncated or corrupt files never reach a worker. `gate`
    bounds how many uploads are decoded at once."""
    from headforge.pipeline.decode import verify_image

    if not upload.data:
        raise EmptyFileError(f"{upload.filename} is empty", details={"filename": upload.filename})
    if len(upload.data) > settings.max_upload_bytes:
        raise FileTooLargeError(
            f"{upload.filename} is {len(upload.data)} bytes, over the {settings.max_upload_bytes} byte limit",
            details={
                "filename": upload.filename,
                "bytes": len(upload.data),
                "max_bytes": settings.max_upload_bytes,
            },
        )
    try:
        if gate is None:
            probe = verify_image(upload.data)
        else:
            with gate:
                probe = verify_image(upload.data)
    except HeadforgeError as error:
        error.details = {**error.details, "filename": upload.filename}
        raise
    return {"format": probe.format, "width": probe.width, "height": probe.height}


def read_uploads(files: list[UploadFile], settings: Settings) -> list[Upload]:
    uploads = []
    for index, item in enumerate(files):
        data = item.file.read(settings.max_upload_bytes + 1)
        name = safe_filename(item.filename, index)
        if len(data) > settings.max_upload_bytes:
            raise FileTooLargeError(
                f"{name} is over the {settings.max_upload_bytes} byte limit",
                details={"filename": name, "max_bytes": settings.max_upload_bytes},
            )
        uploads.append(Upload(name, data))
    return uploads


def _zip_entry_count(handle: IO[bytes]) -> int | None:
    """The entry count an archive's end-of-central-directory record declares (ZIP64 included), read
    from its last 64 KiB before `zipfile` parses (and holds) the whole central directory; None when
    no such record is found (then `zipfile` refuses the file)."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    tail_start = max(0, size - (ZIP_EOCD_SEARCH + 22))
    handle.seek(tail_start)
    tail = handle.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        return None
    count = int.from_bytes(tail[end + 10 : end + 12], "little")
    locator = end - 20
    if count == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        record = int.from_bytes(tail[locator + 8 : locator + 16], "little")
        if record + 40 <= size:
            handle.seek(record)
            zip64 = handle.read(40)
            if zip64[:4] == b"PK\x06\x06":
                count = int.from_bytes(zip64[32:40], "little")
    return count


def unzip(source: bytes | IO[bytes], settings: Settings) -> list[Upload]:
    """Image entries of a zip, with limits on count and expanded size (zip bombs).

    Before anything is extracted: the entry count the archive declares (before `zipfile` reads its
    central directory), then each image entry's declared size against the per-file limit and
    `MAX_ZIP_RATIO`, and their sum against the request limit (what the images could have weighed
    sent one by one). Each entry is then read in blocks under a running cap, so an entry whose data
    expands past what its header says stops there, and one whose first block is no image format
    is refused before the rest of it is inflated."""
    from headforge.pipeline.decode import sniff_format

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    max_entries = ZIP_MAX_ENTRIES_FACTOR * settings.max_files_per_batch
    try:
        declared_count = _zip_entry_count(handle)
        handle.seek(0)
    except (OSError, ValueError) as error:
        raise NotAnImageError("the archive is not a readable zip file") from error
    if declared_count is not None and declared_count > max_entries:
        raise TooManyFilesError(
            f"the archive holds {declared_count} entries, over the limit of {max_entries}",
            details={"entries": declared_count, "max_entries": max_entries},
        )
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise NotAnImageError("the archive is not a readable zip file") from None
    if len(archive.infolist()) > max_entries:
        raise TooManyFilesError(
            f"the archive holds over {max_entries} entries",
            details={"entries": len(archive.infolist()), "max_entries": max_entries},
        )
    entries = [
        info
        for info in archive.infolist()
        if not info.is_dir()
        and not PurePosixPath(info.filename).name.startswith(".")
        and "__MACOSX" not in info.filename
        and PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
    ]
    if not entries:
        raise InvalidOptionError("the archive holds no image files (jpg, png, webp, bmp, tiff)")
    if len(entries) > settings.max_files_per_batch:
        raise TooManyFilesError(
            f"the archive holds {len(entries)} images, over the limit of {settings.max_files_per_batch}",
            details={"files": len(entries), "max_files": settings.max_files_per_batch},
        )
    declared = 0
    for index, info in enumerate(entries):
        name = safe_filename(info.filename, index)
        if info.file_size > settings.max_upload_bytes:
            raise FileTooLargeError(
                f"{name} expands to {info.file_size} bytes, over the limit",
                details={"filename": name, "bytes": info.file_size, "max_bytes": settings.max_upload_bytes},
            )
        if info.file_size > ZIP_RATIO_MIN_BYTES and info.file_size > MAX_ZIP_RATIO * max(
            1, info.compress_size
        ):
            raise FileTooLargeError(
                f"{name} expands {info.file_size / max(1, info.compress_size):.0f} times its stored size "
                f"(the limit is {MAX_ZIP_RATIO}); refused as a zip bomb",
                details={
                    "filename": name,
                    "bytes": info.file_size,
                    "stored_bytes": info.compress_size,
                    "max_ratio": MAX_ZIP_RATIO,
                },
            )
        declared += info.file_size
    if declared > settings.max_request_bytes:
        raise FileTooLargeError(
            f"the archive expands to {declared} bytes, over the {settings.max_request_bytes} byte request limit",
            details={"bytes": declared, "max_bytes": settings.max_request_bytes},
        )
    uploads = []
    total = 0
    for index, info in enumerate(entries):
        name = safe_filename(info.filename, index)
        cap = min(info.file_size, settings.max_upload_bytes)
        parts: list[bytes] = []
        size = 0
        try:
            with archive.open(info) as entry:
                while block := entry.read(min(ZIP_READ_BLOCK, cap + 1 - size)):
                    if not parts and sniff_format(block) is None:
                        raise NotAnImageError(
                            f"{name} in the archive is not a JPEG, PNG, WebP, BMP or TIFF file",
                            details={"filename": name},
                        )
                    size += len(block)
                    total += len(block)
                    if size > cap or total > settings.max_request_bytes:
                        raise FileTooLargeError(
                            f"{name} expands past its declared size or the limits",
                            details={"filename": name, "max_bytes": cap},
                        )
                    parts.append(block)
        except (
            zipfile.BadZipFile,
            OSError,
            EOFError,
            ValueError,
            NotImplementedError,
            RuntimeError,
            zlib.error,
        ) as error:
            raise NotAnImageError(
                f"{name} cannot be read from the archive: {type(error).__name__}", details={"filename": name}
            ) from None
        uploads.append(Upload(name, b"".join(parts)))
    return uploads


def fingerprint(kind: str, uploads: list[Upload], options: dict[str, Any], webhook_url: str | None) -> str:
    digest = hashlib.sha256(kind.encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update((webhook_url or "").encode())
    for upload in uploads:
        digest.update(hashlib.sha256(upload.data).digest())
    return digest.hexdigest()
