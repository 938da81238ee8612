"""Small file helpers shared across headforge: atomic writes and sha256 of a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

CHUNK_SIZE = 1 << 20


@contextmanager
def atomic_writer(path: Path, *, fsync: bool = False, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary temp file beside `path` (its `.name` is the temp path). When the block exits
    cleanly the file is fsynced if asked, closed, given `mode` and renamed over `path`; when it
    raises, the temp file is deleted and `path` is untouched. Readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, before the rename
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with stream:
            yield stream
            if fsync:
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(stream.name, mode)
        os.replace(stream.name, path)
    except BaseException:
        Path(stream.name).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, *, fsync: bool = False, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path, fsync=fsync, mode=mode) as stream:
        stream.write(data)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()
