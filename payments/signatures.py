"""The provider's webhook signature: `t=<unix seconds>,v1=<hex hmac_sha256(secret, f"{t}.{body}")>`.

The header is untrusted input, so it is parsed strictly: anything that is not exactly that shape
is refused before any arithmetic or comparison is done with it.
"""

import hashlib
import hmac
import re
import time

MAX_HEADER_LENGTH = 1024
# Several v1 entries let the provider sign with an old and a new secret while one is rotated.
MAX_SIGNATURES = 5
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class WebhookRejected(Exception):
    """The webhook request is not from the provider or not well-formed; nothing is stored."""


def _parse(header: object) -> tuple[int, list[str]]:
    if not isinstance(header, str) or not header:
        raise WebhookRejected("missing signature header")
    if len(header) > MAX_HEADER_LENGTH:
        raise WebhookRejected("signature header too long")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.partition("=")
        if key == "t" and sep and timestamp is None and _TIMESTAMP.fullmatch(value):
            timestamp = int(value)
        elif key == "v1" and sep and len(signatures) < MAX_SIGNATURES and _SIGNATURE.fullmatch(value):
            signatures.append(value)
        else:
            raise WebhookRejected("malformed signature header")
    if timestamp is None or not signatures:
        raise WebhookRejected("malformed signature header")
    return timestamp, signatures


def verify_signature(*, secret: str, body: bytes, header: str, tolerance: int, now: float | None = None) -> None:
    """Raise WebhookRejected unless one of the header's v1 signatures signs `body` within `tolerance` seconds of now."""
    timestamp, signatures = _parse(header)
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected("signature timestamp outside the tolerance")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest().encode()
    # Every candidate is compared, so the time taken does not say which one matched.
    matches = [hmac.compare_digest(expected, signature.encode()) for signature in signatures]
    if not any(matches):
        raise WebhookRejected("signature does not match")
