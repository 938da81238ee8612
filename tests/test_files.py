"""The shared file helpers: atomic writes and file hashing."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from headforge.files import CHUNK_SIZE, atomic_writer, sha256_file, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.bin"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first" and _mode(target) == 0o644
    write_atomic(target, b"second", fsync=True, mode=0o600)
    assert target.read_bytes() == b"second" and _mode(target) == 0o600
    assert os.listdir(target.parent) == ["data.bin"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    write_atomic(target, b"kept")
    with pytest.raises(RuntimeError), atomic_writer(target) as stream:
        stream.write(b"partial")
        raise RuntimeError("stop")
    assert target.read_bytes() == b"kept"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_atomic_writer_exposes_the_temp_path_before_publishing(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    with atomic_writer(target) as stream:
        stream.write(b"abc")
        stream.flush()
        temp = Path(stream.name)
        assert temp.parent == tmp_path and temp.read_bytes() == b"abc" and not target.exists()
    assert target.read_bytes() == b"abc" and not temp.exists()


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_SIZE * 2 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
