"""API keys: configured by the operator, stored only as SHA-256 hashes, sent as `Authorization: Bearer`.

Keys come from `HEADFORGE_API_KEYS_FILE` (JSON, see docs/service.md) and/or `HEADFORGE_API_KEYS`
(`id:sha256hex` pairs separated by commas). With no key configured, auth is off and every request
acts as the owner `anonymous`; the server says so loudly at startup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headforge.errors import UnauthorizedError
from headforge.service.settings import Settings

ANONYMOUS = "anonymous"


def hash_key(raw_key: str) -> str:
    """The stored form of a key: lowercase hex SHA-256 (keys are random, so no salt/KDF is needed)."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh random key and its hash: give the key to the client, store the hash."""
    raw = "hf_" + secrets.token_urlsafe(32)
    return raw, hash_key(raw)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner id that scopes jobs, and that key's limits."""

    owner: str
    rate_limit_per_minute: float
    rate_limit_burst: int
    max_queued: int


def _parse_hash(value: str, where: str) -> str:
    digest = value.strip().lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{where}: expected a 64-character hex SHA-256 of the key")
    return digest


class Authenticator:
    """Maps a bearer token to a `Principal`, or raises `UnauthorizedError`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys: dict[str, Principal] = {}
        if settings.api_keys_file is not None:
            self._load_file(settings.api_keys_file)
        for item in filter(None, (p.strip() for p in settings.api_keys_inline.split(","))):
            owner, _, digest = item.partition(":")
            self._add(owner.strip(), _parse_hash(digest, "HEADFORGE_API_KEYS"), {})

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def _add(self, owner: str, digest: str, limits: dict[str, Any]) -> None:
        if not owner or owner == ANONYMOUS:
            raise ValueError(f"API key owner id must be non-empty and not {ANONYMOUS!r}")
        self.keys[digest] = Principal(
            owner=owner,
            rate_limit_per_minute=float(
                limits.get("rate_limit_per_minute", self.settings.rate_limit_per_minute)
            ),
            rate_limit_burst=int(limits.get("rate_limit_burst", self.settings.rate_limit_burst)),
            max_queued=int(limits.get("max_queued", self.settings.max_queued_per_key)),
        )

    def _load_file(self, path: Path) -> None:
        document = json.loads(path.read_text())
        entries = document.get("keys", []) if isinstance(document, dict) else document
        for number, entry in enumerate(entries):
            self._add(str(entry["id"]), _parse_hash(str(entry["sha256"]), f"{path} entry {number}"), entry)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return Principal(
                ANONYMOUS,
                self.settings.rate_limit_per_minute,
                self.settings.rate_limit_burst,
                self.settings.max_queued_per_key,
            )
        if not authorization:
            raise UnauthorizedError("an API key is required: send `Authorization: Bearer <key>`")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("use `Authorization: Bearer <key>`")
        digest = hash_key(token.strip())
        for stored, principal in self.keys.items():
            if hmac.compare_digest(stored, digest):
                return principal
        raise UnauthorizedError("unknown API key")
