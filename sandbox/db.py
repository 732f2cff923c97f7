"""The SQLite ledger file: one connection per thread, WAL, and `BEGIN IMMEDIATE` for every write.

`BEGIN IMMEDIATE` takes the database's write lock at the start of the transaction, so a read-then-write
(claiming an idempotency key, consuming a fault counter) is atomic across threads and worker processes.
"""

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator

from sandbox.config import get_settings

# How long a writer waits for another's lock before SQLite raises "database is locked".
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('succeeded', 'declined')),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    reference TEXT NOT NULL,
    description TEXT,
    metadata TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    failure_code TEXT,
    created INTEGER NOT NULL,
    payment_method TEXT
);

CREATE TABLE IF NOT EXISTS payment_methods (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    brand TEXT NOT NULL,
    last4 TEXT NOT NULL,
    exp_month INTEGER NOT NULL,
    exp_year INTEGER NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('succeed', 'decline', 'insufficient_funds', 'retry')),
    metadata TEXT NOT NULL,
    charge_attempts INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_reference ON charges (reference);

CREATE TABLE IF NOT EXISTS shipments (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    items TEXT NOT NULL,
    metadata TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS shipments_order_id ON shipments (order_id);

-- A refund takes back part or all of a succeeded charge; the ledger never refunds more than was charged.
CREATE TABLE IF NOT EXISTS refunds (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('succeeded', 'pending', 'failed')),
    charge_id TEXT NOT NULL REFERENCES charges (id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    reference TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refunds_charge_id ON refunds (charge_id);
CREATE INDEX IF NOT EXISTS refunds_reference ON refunds (reference);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    response_status INTEGER,
    response_body TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE IF NOT EXISTS faults (
    name TEXT PRIMARY KEY,
    value NOT NULL
);

CREATE TABLE IF NOT EXISTS webhook_events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    created INTEGER NOT NULL,
    charge_id TEXT,
    body TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    delivery_status TEXT NOT NULL CHECK (delivery_status IN ('pending', 'delivered', 'failed', 'skipped')),
    attempt_count INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_events_due ON webhook_events (delivery_status, next_attempt_at);

CREATE TABLE IF NOT EXISTS webhook_attempts (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    attempted_at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_attempts_event ON webhook_attempts (event_id);
"""

_local = threading.local()
_schema_lock = threading.Lock()
_schema_ready: set[tuple[int, str]] = set()


def _open(path: str) -> sqlite3.Connection:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # isolation_level=None: the sqlite3 module opens no implicit transactions; BEGIN is always explicit.
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    # FULL: a charge the sandbox answered 201 for survives a power cut too, which is what a ledger promises.
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _ensure_schema(connection: sqlite3.Connection, path: str) -> None:
    # Keyed by pid: a forked worker re-checks, which is cheap and harmless.
    marker = (os.getpid(), path)
    if marker in _schema_ready:
        return
    with _schema_lock:
        if marker not in _schema_ready:
            connection.executescript(SCHEMA)
            _add_missing_columns(connection)
            _schema_ready.add(marker)


# Columns added after a ledger file may have been made: (table, column, declaration).
ADDED_COLUMNS = [("charges", "payment_method", "TEXT")]


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    for table, column, declaration in ADDED_COLUMNS:
        present = {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            try:
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise


def connection() -> sqlite3.Connection:
    """This thread's connection to the ledger (opened, and the schema created, on first use)."""
    path = get_settings().db_path
    pid = os.getpid()
    current = getattr(_local, "connection", None)
    # A connection inherited through fork belongs to the parent; never share it.
    if current is None or _local.path != path or _local.pid != pid:
        current = _open(path)
        _local.connection, _local.path, _local.pid = current, path, pid
        _ensure_schema(current, path)
    return current


def close() -> None:
    """Close this thread's connection (the server's master calls this before forking workers)."""
    current = getattr(_local, "connection", None)
    if current is not None and _local.pid == os.getpid():
        current.close()
    _local.connection = None


@contextlib.contextmanager
def write() -> Iterator[sqlite3.Connection]:
    """A write transaction holding the database's write lock from its first statement; rolls back on error."""
    conn = connection()
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
