"""Fault injection state, stored in the ledger database so every thread and worker process shares it.

Rates are probabilities per create request; `fail_next` and the `fail_after_*_next` counters are consumed
one per request inside a write transaction, so "fail N times, then succeed" is exact under concurrency.
"""

import random
import sqlite3
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from sandbox import db
from sandbox.config import get_settings


@dataclass(frozen=True)
class Faults:
    error_rate: float = 0.0
    latency_ms: int = 0
    timeout_rate: float = 0.0
    decline_rate: float = 0.0
    timeout_seconds: float = 30.0
    fail_next: int = 0
    fail_after_charge_next: int = 0
    fail_after_shipment_next: int = 0
    fail_after_refund_next: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


FIELDS = tuple(Faults.__dataclass_fields__)
INTEGER_FIELDS = {
    "latency_ms",
    "fail_next",
    "fail_after_charge_next",
    "fail_after_shipment_next",
    "fail_after_refund_next",
}


class InjectedFault(StrEnum):
    FAIL_NEXT = "fail_next"
    TIMEOUT = "timeout"
    ERROR = "error"


def default_faults() -> Faults:
    """The faults the environment configures (counters start at zero)."""
    settings = get_settings()
    return Faults(
        error_rate=settings.error_rate,
        latency_ms=settings.latency_ms,
        timeout_rate=settings.timeout_rate,
        decline_rate=settings.decline_rate,
        timeout_seconds=settings.timeout_seconds,
    )


def _write(conn: sqlite3.Connection, values: dict[str, float | int]) -> None:
    conn.executemany(
        "INSERT INTO faults (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        list(values.items()),
    )


def seed_faults(*, from_environment: bool) -> Faults:
    """Store defaults for missing settings; with `from_environment`, explicitly set variables also win.

    Runtime changes otherwise survive a restart: the operator who set them is the one who clears them.
    """
    defaults = default_faults().as_dict()
    with db.write() as conn:
        conn.executemany("INSERT OR IGNORE INTO faults (name, value) VALUES (?, ?)", list(defaults.items()))
        if from_environment:
            _write(conn, get_settings().env_faults())
    return get_faults()


def get_faults() -> Faults:
    """The current fault settings."""
    rows = db.connection().execute("SELECT name, value FROM faults").fetchall()
    stored = {row["name"]: row["value"] for row in rows if row["name"] in FIELDS}
    values = {**default_faults().as_dict(), **stored}
    parsed: dict[str, Any] = {name: int(v) if name in INTEGER_FIELDS else float(v) for name, v in values.items()}
    return Faults(**parsed)


def update_faults(*, changes: dict[str, float | int]) -> Faults:
    """Change the given settings (others keep their value) and return the whole new state."""
    unknown = set(changes) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fault settings: {sorted(unknown)}")
    with db.write() as conn:
        _write(conn, changes)
    return get_faults()


def reset_faults() -> Faults:
    """Back to the environment's defaults, with every counter at zero."""
    with db.write() as conn:
        conn.execute("DELETE FROM faults")
        _write(conn, default_faults().as_dict())
    return get_faults()


def consume_counter(conn: sqlite3.Connection, name: str) -> bool:
    """Take one from a counter; True when one was left. Call inside a `db.write()` transaction."""
    if name not in INTEGER_FIELDS:
        raise ValueError(f"{name} is not a counter")
    cursor = conn.execute("UPDATE faults SET value = value - 1 WHERE name = ? AND value > 0", (name,))
    return cursor.rowcount == 1


def decide_front_door_fault(faults: Faults) -> InjectedFault | None:
    """The fault, if any, a create request meets before the provider acts (nothing is recorded then).

    `fail_next` is checked first so it is deterministic whatever the rates are.
    """
    if faults.fail_next > 0:
        with db.write() as conn:
            if consume_counter(conn, "fail_next"):
                return InjectedFault.FAIL_NEXT
    if faults.timeout_rate and random.random() < faults.timeout_rate:
        return InjectedFault.TIMEOUT
    if faults.error_rate and random.random() < faults.error_rate:
        return InjectedFault.ERROR
    return None
