"""The webhook's signature: HMAC-SHA256 over the timestamp and the exact body (pure).

A request carries::

    X-Makima-Timestamp: 1767225600
    X-Makima-Signature: sha256=<hex of HMAC-SHA256(secret, b"1767225600." + body)>

To check one, a receiver takes the raw body bytes (before any JSON parsing),
recomputes the HMAC over ``timestamp + "." + body`` with the shared secret,
compares it with the header in constant time, and refuses a timestamp more
than a few minutes away from its clock (so that a captured request cannot be
replayed later). :func:`verify` does all of that.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Makima-Signature"
TIMESTAMP_HEADER = "X-Makima-Timestamp"
PREFIX = "sha256="
TOLERANCE = 300
"""Seconds a timestamp may be away from the receiver's clock."""


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def signed_material(timestamp: int, body: bytes) -> bytes:
    """What is signed: the decimal timestamp, a dot, the body."""
    return f"{timestamp}.".encode() + body


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(_key(secret), signed_material(timestamp, body), hashlib.sha256)
    return PREFIX + digest.hexdigest()


def signature_headers(secret: str | bytes, timestamp: int, body: bytes) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verify(
    secret: str | bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float,
    tolerance: float = TOLERANCE,
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp``, which is within
    ``tolerance`` seconds of ``now`` (both header values as received, or None)."""
    if timestamp is None or signature is None or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    sent = int(timestamp)
    if abs(now - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature.strip())
