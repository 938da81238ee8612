"""Completion webhooks: URL checks (no loopback or private targets by default), HMAC signing, delivery.

Each delivery is a JSON `POST` with these headers:

* `X-Headforge-Event`: `job.succeeded`, `job.failed` or `job.canceled`
* `X-Headforge-Delivery`: `<job id>.<event>`, the same on every retry (receivers deduplicate on it)
* `X-Headforge-Timestamp`: Unix seconds when this attempt was sent
* `X-Headforge-Signature`: `sha256=` + hex HMAC-SHA256 of the raw request body, keyed with
  `HEADFORGE_WEBHOOK_SECRET`

A 2xx answer ends delivery; anything else (or no answer within 10 s) is retried with exponential
backoff (2, 4, 8, … s) up to `HEADFORGE_WEBHOOK_MAX_ATTEMPTS` attempts.

The worker that finishes a job publishes `job.succeeded` or `job.failed`; the gateway publishes
`job.canceled` when a DELETE cancels a queued or running job. `tasks.deliver_webhook` sends all three.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from headforge.errors import WebhookHostUnresolvedError, WebhookRefusedError

SIGNATURE_HEADER = "X-Headforge-Signature"
EVENT_HEADER = "X-Headforge-Event"
DELIVERY_HEADER = "X-Headforge-Delivery"
TIMESTAMP_HEADER = "X-Headforge-Timestamp"
TIMEOUT_SECONDS = 10.0


def sign(body: bytes, secret: str) -> str:
    """The `X-Headforge-Signature` value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """Check a received signature in constant time (for receivers written in Python)."""
    return hmac.compare_digest(sign(body, secret), header)


# Every block of the IANA IPv4 and IPv6 Special-Purpose Address Registries (as of 2025), whether or
# not the registry marks it globally reachable, plus multicast. Python's `ipaddress` flags most but
# not all of them (192.0.0.8/32, the AS112 and AMT blocks, 6to4 and NAT64 prefixes pass `is_global`).
SPECIAL_PURPOSE_NETWORKS = tuple(
    ipaddress.ip_network(block)
    for block in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "100:0:0:1::/64",
        "2001::/23",
        "2001:db8::/32",
        "2002::/16",
        "2620:4f:8000::/48",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
        # Deprecated, and still no place for a webhook: IPv4-compatible addresses (RFC 4291) and site-local.
        "::/96",
        "fec0::/10",
    )
)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == network.version and ip in network for network in SPECIAL_PURPOSE_NETWORKS):
        return False
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast)


def check_webhook_url(url: str, allow_private: bool, resolve: bool = True) -> str:
    """Return `url` if it is an http(s) URL whose host resolves only to public addresses
    (or `allow_private`); raise `WebhookRefusedError` otherwise."""
    if len(url) > 2048:
        raise WebhookRefusedError("webhook_url is too long", details={"max_length": 2048})
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise WebhookRefusedError(f"webhook_url is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefusedError(
            "webhook_url must be an http:// or https:// URL with a host", details={"webhook_url": url}
        )
    if parts.username or parts.password:
        raise WebhookRefusedError("webhook_url must not carry credentials")
    if allow_private:
        return url
    if not resolve:
        return url
    try:
        infos = socket.getaddrinfo(
            parts.hostname, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except (socket.gaierror, UnicodeError) as error:
        raise WebhookHostUnresolvedError(
            f"webhook_url host does not resolve: {parts.hostname}",
            details={"host": parts.hostname, "reason": str(error)},
        ) from None
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not _is_public(a)]
    if refused:
        raise WebhookRefusedError(
            "webhook_url points at a loopback, private or reserved address",
            details={"host": parts.hostname, "addresses": refused},
        )
    return url


def build_body(event: str, job: dict[str, Any]) -> bytes:
    """The exact bytes that are signed and sent."""
    return json.dumps({"event": event, "job": job}, separators=(",", ":"), sort_keys=True).encode()


def post(url: str, body: bytes, *, event: str, delivery_id: str, secret: str, timestamp: int) -> int:
    """Send one attempt and return the HTTP status (raises on network errors)."""
    import httpx

    headers = {
        "Content-Type": "application/json",
        "User-Agent": "headforge-webhook/1",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(body, secret),
    }
    response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_SECONDS, follow_redirects=False)
    return response.status_code
