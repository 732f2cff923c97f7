"""Webhook signatures: `Sandbox-Signature: t=<unix>,v1=<hex hmac_sha256(secret, f"{t}.{body}")>`.

Standard library only, so the shop can verify signatures (or sign test payloads) with the same code.
"""

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Sandbox-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


def _to_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def compute_signature(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `f"{timestamp}.{body}"` under the secret."""
    signed_payload = f"{int(timestamp)}.".encode() + _to_bytes(body)
    return hmac.new(_to_bytes(secret), signed_payload, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The `Sandbox-Signature` header value for a body sent at `timestamp` (unix seconds)."""
    return f"t={int(timestamp)},{SCHEME}={compute_signature(secret, body, timestamp)}"


def parse_header(header: str) -> tuple[int, list[str]] | None:
    """`(timestamp, [v1 signatures])` from a header value, or None when it is malformed."""
    timestamp = None
    signatures = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if name == "t":
            if not value.isascii() or not value.isdigit():
                return None
            timestamp = int(value)
        elif name == SCHEME:
            signatures.append(value)
    if timestamp is None or not signatures:
        return None
    return timestamp, signatures


def verify(
    secret: str | bytes,
    body: bytes,
    header: str | None,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """True when one of the header's v1 signatures matches the body and its timestamp is within tolerance.

    Several v1 entries are accepted so a secret can be rotated. A malformed header is False, never an exception.
    """
    if not header:
        return False
    parsed = parse_header(header)
    if parsed is None:
        return False
    timestamp, signatures = parsed
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = compute_signature(secret, body, timestamp)
    # Bytes, not str: compare_digest raises on non-ASCII str, and a header is untrusted input.
    return any(hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in signatures)
