"""Signed webhooks to the shop, delivered at least once from a background thread.

Events are written in the same transaction as the charge or refund they describe (an outbox), so a crash between
charging and sending loses nothing: the next process start delivers what is still pending. Each attempt
is signed afresh and recorded in `webhook_attempts`.
"""

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from typing import Any

import requests

from sandbox import db
from sandbox.config import get_settings
from sandbox.signing import SIGNATURE_HEADER, sign

logger = logging.getLogger("sandbox.webhooks")

# A claimed event is invisible to other deliverers for this long; a deliverer that dies mid-send
# therefore delays the event, it does not lose it.
CLAIM_LEASE_SECONDS = 60
POLL_SECONDS = 0.5
BATCH_SIZE = 20
MAX_RETRY_DELAY_SECONDS = 300


def enqueue_event(
    conn: sqlite3.Connection,
    *,
    event_type: str,
    charge: dict[str, Any] | None = None,
    refund: dict[str, Any] | None = None,
) -> str:
    """Record an event for a charge or a refund (exactly one); call inside the `db.write()` transaction
    that records it. The payload's `data` holds the object under its name; the event is filed under the
    charge it concerns (a refund's too), so `/v1/events?charge_id=` shows a charge's whole story.
    """
    if (charge is None) == (refund is None):
        raise ValueError("an event describes exactly one charge or one refund")
    settings = get_settings()
    event_id = f"evt_{secrets.token_hex(12)}"
    created = int(time.time())
    if charge is not None:
        data, charge_id = {"charge": charge}, charge["id"]
    else:
        assert refund is not None
        data, charge_id = {"refund": refund}, refund["charge"]
    body = json.dumps({"id": event_id, "type": event_type, "created": created, "data": data}, separators=(",", ":"))
    status = "pending" if settings.webhook_url else "skipped"
    conn.execute(
        "INSERT INTO webhook_events (id, type, created, charge_id, body, endpoint, delivery_status, next_attempt_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (event_id, event_type, created, charge_id, body, settings.webhook_url, status, time.time()),
    )
    return event_id


def _claim_due_events() -> list[sqlite3.Row]:
    now = time.time()
    due = "SELECT 1 FROM webhook_events WHERE delivery_status = 'pending' AND next_attempt_at <= ? LIMIT 1"
    # A plain read first: an idle poll must not take the write lock that requests need.
    if db.connection().execute(due, (now,)).fetchone() is None:
        return []
    with db.write() as conn:
        rows = conn.execute(
            "SELECT id, body, endpoint, attempt_count FROM webhook_events"
            " WHERE delivery_status = 'pending' AND next_attempt_at <= ? ORDER BY seq LIMIT ?",
            (now, BATCH_SIZE),
        ).fetchall()
        conn.executemany(
            "UPDATE webhook_events SET next_attempt_at = ? WHERE id = ?",
            [(now + CLAIM_LEASE_SECONDS, row["id"]) for row in rows],
        )
    return rows


def _send(event: sqlite3.Row) -> tuple[int | None, str | None]:
    settings = get_settings()
    body = event["body"].encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "sandbox-webhooks/1",
        SIGNATURE_HEADER: sign(settings.webhook_secret, body, int(time.time())),
    }
    try:
        response = requests.post(
            event["endpoint"], data=body, headers=headers, timeout=(3, settings.webhook_timeout_seconds)
        )
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, response.text[:500]


def _record_attempt(event: sqlite3.Row, status_code: int | None, error: str | None, duration_ms: int) -> None:
    settings = get_settings()
    attempt = event["attempt_count"] + 1
    now = time.time()
    delivered = status_code is not None and error is None
    if delivered:
        new_status, next_attempt_at = "delivered", None
    elif attempt >= settings.webhook_max_attempts:
        new_status, next_attempt_at = "failed", None
    else:
        delay = min(settings.webhook_retry_seconds * 2 ** (attempt - 1), MAX_RETRY_DELAY_SECONDS)
        new_status, next_attempt_at = "pending", now + delay
    with db.write() as conn:
        # The ledger may have been reset while the request was in flight; then there is nothing to record.
        updated = conn.execute(
            "UPDATE webhook_events SET delivery_status = ?, attempt_count = ?, next_attempt_at = ?, delivered_at = ?"
            " WHERE id = ?",
            (new_status, attempt, next_attempt_at, now if delivered else None, event["id"]),
        ).rowcount
        if updated:
            conn.execute(
                "INSERT INTO webhook_attempts (event_id, attempt, attempted_at, status_code, error, duration_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (event["id"], attempt, now, status_code, error, duration_ms),
            )
    log = logger.info if delivered else logger.warning
    log("webhook %s attempt %s -> %s %s", event["id"], attempt, status_code, new_status)


def deliver_due_events() -> int:
    """Send every event that is due now; returns how many were attempted."""
    events = _claim_due_events()
    for event in events:
        started = time.monotonic()
        status_code, error = _send(event)
        _record_attempt(event, status_code, error, int((time.monotonic() - started) * 1000))
    return len(events)


class _Deliverer:
    """One delivery thread per process, woken as soon as a new event is committed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def ensure_started(self) -> None:
        """Start this process's thread unless it runs already or no SHOP_WEBHOOK_URL is set (nothing to send)."""
        if not get_settings().webhook_url:
            return
        # After a fork the parent's thread does not exist in the child: start a fresh one there.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self.ensure_started()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                deliver_due_events()
            except sqlite3.Error:
                # A locked or briefly unavailable database: leased events come back after the lease.
                logger.exception("webhook delivery pass failed")
            self._wake.wait(POLL_SECONDS)


deliverer = _Deliverer()
