"""The provider's and warehouse's books: idempotency keys, charges, refunds, shipments, and queries over them.

A create is three steps: claim the idempotency key (committed as `in_flight`), do the work, then record the
result and the stored response in one transaction. So a charge exists exactly when its key holds a response.
"""

import hashlib
import json
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sandbox import db, faults, webhooks
from sandbox.validation import ValidationError

CHARGES = "charges"
REFUNDS = "refunds"
SHIPMENTS = "shipments"
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# Idempotency ------------------------------------------------------------------------------------------------


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # this request owns the key and must do the work
    REPLAY = "replay"  # same key, same parameters, finished: answer with the stored response
    MISMATCH = "mismatch"  # same key, other parameters
    IN_FLIGHT = "in_flight"  # same key, another request is doing the work right now


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    status: int | None = None
    body: str | None = None


def fingerprint(params: dict[str, Any]) -> str:
    """A digest of normalized parameters: the same request always gives the same fingerprint."""
    return hashlib.sha256(_dumps(params).encode()).hexdigest()


def claim_idempotency_key(*, scope: str, key: str, request_fingerprint: str) -> Claim:
    """Claim `key` within `scope` (charges and shipments are separate services with separate keys)."""
    with db.write() as conn:
        row = conn.execute(
            "SELECT fingerprint, state, response_status, response_body FROM idempotency_keys"
            " WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO idempotency_keys (scope, key, fingerprint, state, created)"
                " VALUES (?, ?, ?, 'in_flight', ?)",
                (scope, key, request_fingerprint, time.time()),
            )
            return Claim(ClaimOutcome.CLAIMED)
    if row["fingerprint"] != request_fingerprint:
        return Claim(ClaimOutcome.MISMATCH)
    if row["state"] == "in_flight":
        return Claim(ClaimOutcome.IN_FLIGHT)
    return Claim(ClaimOutcome.REPLAY, row["response_status"], row["response_body"])


def release_idempotency_key(*, scope: str, key: str) -> None:
    """Forget an in-flight claim whose work did not happen, so a retry with the key starts afresh."""
    with db.write() as conn:
        conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND state = 'in_flight'", (scope, key))


def release_abandoned_claims() -> int:
    """Drop every in-flight claim; call only at server start, when no request can be in flight."""
    with db.write() as conn:
        return conn.execute("DELETE FROM idempotency_keys WHERE state = 'in_flight'").rowcount


def _store_response(conn: sqlite3.Connection, *, scope: str, key: str, status: int, body: str) -> None:
    conn.execute(
        "UPDATE idempotency_keys SET state = 'done', response_status = ?, response_body = ?"
        " WHERE scope = ? AND key = ?",
        (status, body, scope, key),
    )


# Creates ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    status: int
    body: str
    # The fault `fail_after_*_next` fired: the work is recorded but the client gets a 500 instead.
    response_lost: bool


def _format_amount(amount_minor: int) -> str:
    return f"{amount_minor // 100}.{amount_minor % 100:02d}"


# A charge with the sum of its succeeded refunds (`refunded_minor`), which `_charge_from_row` needs.
_CHARGE_SELECT = (
    "SELECT charges.*, (SELECT COALESCE(SUM(refunds.amount_minor), 0) FROM refunds"
    " WHERE refunds.charge_id = charges.id AND refunds.status = 'succeeded') AS refunded_minor FROM charges"
)


def _charge_from_row(row: sqlite3.Row) -> dict[str, Any]:
    """A charge as the API shows it; `row` comes from `_CHARGE_SELECT`."""
    return {
        "id": row["id"],
        "object": "charge",
        "status": row["status"],
        "amount": _format_amount(row["amount_minor"]),
        "amount_minor": row["amount_minor"],
        "amount_refunded": _format_amount(row["refunded_minor"]),
        "refunded": row["refunded_minor"] >= row["amount_minor"],
        "currency": row["currency"],
        "reference": row["reference"],
        "description": row["description"],
        "metadata": json.loads(row["metadata"]),
        "idempotency_key": row["idempotency_key"],
        "failure_code": row["failure_code"],
        "payment_method": row["payment_method"],
        "created": row["created"],
    }


# Test cards, as real providers publish them: what a charge with each does. Any other valid number succeeds.
TEST_CARDS = {
    "4242424242424242": "succeed",
    "5555555555554444": "succeed",
    "4000000000000002": "decline",
    "4000000000009995": "insufficient_funds",
    # The first charge attempt with the card fails with a retryable processing error; the next succeeds.
    "4000000000000119": "retry",
}
DECLINE_CODES = {"decline": "card_declined", "insufficient_funds": "insufficient_funds"}


class ProcessingError(Exception):
    """A retryable failure at the card network: nothing was charged, the key is left free."""


def _brand(number: str) -> str:
    if number.startswith("4"):
        return "visa"
    if number[:2] in ("51", "52", "53", "54", "55") or 2221 <= int(number[:4]) <= 2720:
        return "mastercard"
    if number[:2] in ("34", "37"):
        return "amex"
    return "unknown"


def _payment_method_from_row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "payment_method",
        "type": "card",
        "card": {
            "brand": row["brand"],
            "last4": row["last4"],
            "exp_month": row["exp_month"],
            "exp_year": row["exp_year"],
        },
        "metadata": json.loads(row["metadata"]),
        "created": row["created"],
    }


def create_payment_method(*, params: dict[str, Any]) -> dict[str, Any]:
    """Tokenise a card: the number is used for its brand, last four digits and test outcome, then forgotten."""
    number = params["number"]
    payment_method_id = f"pm_{secrets.token_hex(12)}"
    with db.write() as conn:
        conn.execute(
            "INSERT INTO payment_methods (id, brand, last4, exp_month, exp_year, outcome, metadata, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                payment_method_id,
                _brand(number),
                number[-4:],
                params["exp_month"],
                params["exp_year"],
                TEST_CARDS.get(number, "succeed"),
                _dumps(params["metadata"]),
                int(time.time()),
            ),
        )
        row = conn.execute("SELECT * FROM payment_methods WHERE id = ?", (payment_method_id,)).fetchone()
    return _payment_method_from_row(row)


def get_payment_method(*, payment_method_id: str) -> dict[str, Any] | None:
    row = db.connection().execute("SELECT * FROM payment_methods WHERE id = ?", (payment_method_id,)).fetchone()
    return _payment_method_from_row(row) if row else None


def _card_outcome(payment_method_id: str) -> str:
    """Count a charge attempt on the card and say what its test number does. Raises for an unknown id."""
    with db.write() as conn:
        row = conn.execute(
            "SELECT outcome, charge_attempts FROM payment_methods WHERE id = ?", (payment_method_id,)
        ).fetchone()
        if row is None:
            raise ValidationError("payment_method", f"No such payment method: {payment_method_id}", "resource_missing")
        conn.execute(
            "UPDATE payment_methods SET charge_attempts = charge_attempts + 1 WHERE id = ?", (payment_method_id,)
        )
    if row["outcome"] == "retry":
        if row["charge_attempts"] == 0:
            raise ProcessingError("An error occurred while processing the card; try again.")
        return "succeed"
    return row["outcome"]


def is_declined(*, metadata: dict[str, Any], decline_rate: float) -> bool:
    """`metadata.force` of "decline" or "succeed" decides; otherwise a decline with probability `decline_rate`."""
    force = metadata.get("force")
    if force == "decline":
        return True
    if force == "succeed":
        return False
    return bool(decline_rate) and random.random() < decline_rate


def create_charge(*, idempotency_key: str, params: dict[str, Any], current_faults: faults.Faults) -> Created:
    """Record a charge, its stored response and its webhook event in one transaction.

    Call only while holding the claim on `idempotency_key` in the charges scope.
    """
    payment_method = params.get("payment_method")
    card = _card_outcome(payment_method) if payment_method else "succeed"
    force = params["metadata"].get("force")
    if force in ("decline", "succeed") or card == "succeed":
        declined = is_declined(metadata=params["metadata"], decline_rate=current_faults.decline_rate)
        decline_code = "card_declined"
    else:
        declined, decline_code = True, DECLINE_CODES[card]
    status = "declined" if declined else "succeeded"
    charge_id = f"ch_{secrets.token_hex(12)}"
    with db.write() as conn:
        conn.execute(
            "INSERT INTO charges (id, status, amount_minor, currency, reference, description, metadata,"
            " idempotency_key, failure_code, created, payment_method) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                charge_id,
                status,
                params["amount_minor"],
                params["currency"],
                params["reference"],
                params["description"],
                _dumps(params["metadata"]),
                idempotency_key,
                decline_code if declined else None,
                int(time.time()),
                payment_method,
            ),
        )
        charge = _charge_from_row(conn.execute(f"{_CHARGE_SELECT} WHERE id = ?", (charge_id,)).fetchone())
        if declined:
            http_status = 402
            body = {
                "error": {
                    "type": "card_declined",
                    "code": "card_declined",
                    "decline_code": decline_code,
                    "message": "The card was declined."
                    if decline_code == "card_declined"
                    else "The card has insufficient funds.",
                    "charge": charge,
                }
            }
        else:
            http_status, body = 201, charge
        body_text = _dumps(body)
        webhooks.enqueue_event(conn, event_type=f"charge.{status}", charge=charge)
        _store_response(conn, scope=CHARGES, key=idempotency_key, status=http_status, body=body_text)
        lost = faults.consume_counter(conn, "fail_after_charge_next")
    webhooks.deliverer.wake()
    return Created(http_status, body_text, response_lost=lost)


def _refund_from_row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "refund",
        "status": row["status"],
        "amount": _format_amount(row["amount_minor"]),
        "currency": row["currency"],
        "charge": row["charge_id"],
        "reference": row["reference"],
        "idempotency_key": row["idempotency_key"],
        "created": row["created"],
    }


def create_refund(*, idempotency_key: str, params: dict[str, Any], current_faults: faults.Faults) -> Created:
    """Record a refund of a succeeded charge, its stored response and its webhook event in one transaction.

    Refuses with a ValidationError (nothing recorded, so the key is released) an unknown charge (404), a
    charge that did not succeed, another currency, or more than is left of the charge (succeeded and
    pending refunds count). The check and the insert hold one write lock, so concurrent refunds under
    different keys never give back more than was charged. Call only while holding the claim on
    `idempotency_key` in the refunds scope.
    """
    charge_id = params["charge"]
    refund_id = f"re_{secrets.token_hex(12)}"
    with db.write() as conn:
        charge = conn.execute(
            "SELECT status, amount_minor, currency FROM charges WHERE id = ?", (charge_id,)
        ).fetchone()
        if charge is None:
            raise ValidationError("charge", f"No such charge: {charge_id}", "resource_missing", status=404)
        if charge["status"] != "succeeded":
            raise ValidationError(
                "charge",
                f"Charge {charge_id} is {charge['status']}: only a succeeded charge can be refunded.",
                "charge_not_refundable",
            )
        if params["currency"] != charge["currency"]:
            raise ValidationError(
                "currency", f"The charge is in {charge['currency']}, not {params['currency']}.", "currency_mismatch"
            )
        already = conn.execute(
            "SELECT COALESCE(SUM(amount_minor), 0) FROM refunds"
            " WHERE charge_id = ? AND status IN ('succeeded', 'pending')",
            (charge_id,),
        ).fetchone()[0]
        left = charge["amount_minor"] - already
        if params["amount_minor"] > left:
            raise ValidationError(
                "amount",
                f"Only {_format_amount(left)} {charge['currency']} of the charge is left to refund.",
                "amount_too_large",
            )
        conn.execute(
            "INSERT INTO refunds (id, status, charge_id, amount_minor, currency, reference, idempotency_key, created)"
            " VALUES (?, 'succeeded', ?, ?, ?, ?, ?, ?)",
            (
                refund_id,
                charge_id,
                params["amount_minor"],
                params["currency"],
                params["reference"],
                idempotency_key,
                int(time.time()),
            ),
        )
        refund = _refund_from_row(conn.execute("SELECT * FROM refunds WHERE id = ?", (refund_id,)).fetchone())
        body_text = _dumps(refund)
        webhooks.enqueue_event(conn, event_type=f"refund.{refund['status']}", refund=refund)
        _store_response(conn, scope=REFUNDS, key=idempotency_key, status=201, body=body_text)
        lost = faults.consume_counter(conn, "fail_after_refund_next")
    webhooks.deliverer.wake()
    return Created(201, body_text, response_lost=lost)


def _shipment_from_row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "shipment",
        "status": row["status"],
        "order_id": row["order_id"],
        "items": json.loads(row["items"]),
        "metadata": json.loads(row["metadata"]),
        "idempotency_key": row["idempotency_key"],
        "created": row["created"],
    }


def create_shipment(*, idempotency_key: str, params: dict[str, Any], current_faults: faults.Faults) -> Created:
    """Record an accepted shipment and its stored response in one transaction.

    Call only while holding the claim on `idempotency_key` in the shipments scope.
    """
    shipment_id = f"shp_{secrets.token_hex(12)}"
    with db.write() as conn:
        conn.execute(
            "INSERT INTO shipments (id, status, order_id, items, metadata, idempotency_key, created)"
            " VALUES (?, 'accepted', ?, ?, ?, ?, ?)",
            (
                shipment_id,
                params["order_id"],
                _dumps(params["items"]),
                _dumps(params["metadata"]),
                idempotency_key,
                int(time.time()),
            ),
        )
        shipment = _shipment_from_row(conn.execute("SELECT * FROM shipments WHERE id = ?", (shipment_id,)).fetchone())
        body_text = _dumps(shipment)
        _store_response(conn, scope=SHIPMENTS, key=idempotency_key, status=201, body=body_text)
        lost = faults.consume_counter(conn, "fail_after_shipment_next")
    return Created(201, body_text, response_lost=lost)


# Queries ----------------------------------------------------------------------------------------------------


class UnknownCharge(LookupError):
    """A list cursor (`starting_after`) that names no charge."""


class UnknownRefund(LookupError):
    """A list cursor (`starting_after`) that names no refund."""


def _page_rows(
    *,
    select: str,
    table: str,
    conditions: list[tuple[str, Any]],
    starting_after: str | None,
    unknown_cursor: type[LookupError],
    limit: int,
) -> list[sqlite3.Row]:
    """Rows of `select` by `seq`, meeting each condition whose value is not None, after the row `starting_after`.

    `select`, `table` and the conditions' clauses are constants. Raises `unknown_cursor` when `starting_after`
    names no row of `table`.
    """
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in conditions:
        if value is not None:
            clauses.append(clause)
            args.append(value)
    if starting_after is not None:
        cursor = db.connection().execute(f"SELECT seq FROM {table} WHERE id = ?", (starting_after,)).fetchone()  # noqa: S608 (table is a constant)
        if cursor is None:
            raise unknown_cursor(starting_after)
        clauses.append("seq > ?")
        args.append(cursor["seq"])
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return db.connection().execute(f"{select} {where} ORDER BY seq LIMIT ?", (*args, limit)).fetchall()  # noqa: S608 (clauses are constants)


def list_charges(
    *,
    reference: str | None = None,
    status: str | None = None,
    created_gte: int | None = None,
    starting_after: str | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
) -> list[dict[str, Any]]:
    """Charges in the order they were made, optionally filtered; `starting_after` (a charge id) pages on.

    Raises UnknownCharge when `starting_after` names no charge.
    """
    rows = _page_rows(
        select=_CHARGE_SELECT,
        table="charges",
        conditions=[("reference = ?", reference), ("status = ?", status), ("created >= ?", created_gte)],
        starting_after=starting_after,
        unknown_cursor=UnknownCharge,
        limit=limit,
    )
    return [_charge_from_row(row) for row in rows]


def get_charge(*, charge_id: str) -> dict[str, Any] | None:
    row = db.connection().execute(f"{_CHARGE_SELECT} WHERE id = ?", (charge_id,)).fetchone()
    return _charge_from_row(row) if row else None


def list_refunds(
    *,
    charge_id: str | None = None,
    reference: str | None = None,
    starting_after: str | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
) -> list[dict[str, Any]]:
    """Refunds in the order they were made, optionally of one charge and/or under one reference.

    Raises UnknownRefund when `starting_after` names no refund.
    """
    rows = _page_rows(
        select="SELECT * FROM refunds",
        table="refunds",
        conditions=[("charge_id = ?", charge_id), ("reference = ?", reference)],
        starting_after=starting_after,
        unknown_cursor=UnknownRefund,
        limit=limit,
    )
    return [_refund_from_row(row) for row in rows]


def get_refund(*, refund_id: str) -> dict[str, Any] | None:
    row = db.connection().execute("SELECT * FROM refunds WHERE id = ?", (refund_id,)).fetchone()
    return _refund_from_row(row) if row else None


def list_shipments(*, order_id: int | None = None, limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
    """Shipments in the order they were accepted, optionally for one order."""
    if order_id is None:
        rows = db.connection().execute("SELECT * FROM shipments ORDER BY seq LIMIT ?", (limit,)).fetchall()
    else:
        rows = (
            db.connection()
            .execute("SELECT * FROM shipments WHERE order_id = ? ORDER BY seq LIMIT ?", (order_id, limit))
            .fetchall()
        )
    return [_shipment_from_row(row) for row in rows]


def get_shipment(*, shipment_id: str) -> dict[str, Any] | None:
    row = db.connection().execute("SELECT * FROM shipments WHERE id = ?", (shipment_id,)).fetchone()
    return _shipment_from_row(row) if row else None


def list_events(*, charge_id: str | None = None, limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
    """Webhook events with their delivery state and every attempt."""
    conn = db.connection()
    if charge_id is None:
        rows = conn.execute("SELECT * FROM webhook_events ORDER BY seq LIMIT ?", (limit,)).fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM webhook_events WHERE charge_id = ? ORDER BY seq LIMIT ?", (charge_id, limit)
        ).fetchall()
    events = []
    for row in rows:
        attempts = conn.execute(
            "SELECT attempt, attempted_at, status_code, error, duration_ms FROM webhook_attempts"
            " WHERE event_id = ? ORDER BY attempt",
            (row["id"],),
        ).fetchall()
        events.append(
            {
                "id": row["id"],
                "object": "event",
                "type": row["type"],
                "created": row["created"],
                "charge_id": row["charge_id"],
                "payload": json.loads(row["body"]),
                "delivery": {
                    "endpoint": row["endpoint"],
                    "status": row["delivery_status"],
                    "attempt_count": row["attempt_count"],
                    "next_attempt_at": row["next_attempt_at"] if row["delivery_status"] == "pending" else None,
                    "delivered_at": row["delivered_at"],
                    "attempts": [dict(attempt) for attempt in attempts],
                },
            }
        )
    return events


def summarize_ledger() -> dict[str, Any]:
    """Counts that let a test assert "one charge per reference", "one shipment per order", "no over-refund"."""
    conn = db.connection()
    # One read transaction, so the counts agree with each other.
    conn.execute("BEGIN")
    try:
        charge_rows = conn.execute(
            "SELECT reference, status, COUNT(*) AS n FROM charges GROUP BY reference, status"
        ).fetchall()
        shipment_rows = conn.execute("SELECT order_id, COUNT(*) AS n FROM shipments GROUP BY order_id").fetchall()
        key_rows = conn.execute(
            "SELECT scope, state, COUNT(*) AS n FROM idempotency_keys GROUP BY scope, state"
        ).fetchall()
        event_rows = conn.execute(
            "SELECT delivery_status, COUNT(*) AS n FROM webhook_events GROUP BY delivery_status"
        ).fetchall()
        attempt_count = conn.execute("SELECT COUNT(*) FROM webhook_attempts").fetchone()[0]
        payment_method_count = conn.execute("SELECT COUNT(*) FROM payment_methods").fetchone()[0]
        refund_rows = conn.execute(
            "SELECT status, currency, COUNT(*) AS n, SUM(amount_minor) AS amount_minor FROM refunds"
            " GROUP BY status, currency"
        ).fetchall()
        over_refunded = conn.execute(
            "SELECT charges.id FROM charges JOIN refunds ON refunds.charge_id = charges.id"
            " WHERE refunds.status IN ('succeeded', 'pending')"
            " GROUP BY charges.id HAVING SUM(refunds.amount_minor) > MAX(charges.amount_minor) ORDER BY charges.id"
        ).fetchall()
    finally:
        conn.execute("COMMIT")

    by_status = {"succeeded": 0, "declined": 0}
    by_reference: dict[str, dict[str, int]] = {}
    for row in charge_rows:
        by_status[row["status"]] += row["n"]
        counts = by_reference.setdefault(row["reference"], {"succeeded": 0, "declined": 0, "total": 0})
        counts[row["status"]] += row["n"]
        counts["total"] += row["n"]
    by_order_id = {str(row["order_id"]): row["n"] for row in shipment_rows}
    keys_by_scope = {CHARGES: 0, REFUNDS: 0, SHIPMENTS: 0}
    in_flight = 0
    for row in key_rows:
        keys_by_scope[row["scope"]] = keys_by_scope.get(row["scope"], 0) + row["n"]
        in_flight += row["n"] if row["state"] == "in_flight" else 0
    events_by_status = {"pending": 0, "delivered": 0, "failed": 0, "skipped": 0}
    for row in event_rows:
        events_by_status[row["delivery_status"]] = row["n"]
    refunds_by_status = {"succeeded": 0, "pending": 0, "failed": 0}
    refunded_minor_by_currency: dict[str, int] = {}
    for row in refund_rows:
        refunds_by_status[row["status"]] += row["n"]
        if row["status"] == "succeeded":
            refunded_minor_by_currency[row["currency"]] = row["amount_minor"]
    return {
        "charges": {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_reference": by_reference,
            "references_charged_more_than_once": sorted(
                reference for reference, counts in by_reference.items() if counts["succeeded"] > 1
            ),
        },
        "shipments": {
            "total": sum(by_order_id.values()),
            "by_order_id": by_order_id,
            "orders_shipped_more_than_once": sorted((int(o) for o, n in by_order_id.items() if n > 1)),
        },
        "refunds": {
            "total": sum(refunds_by_status.values()),
            "by_status": refunds_by_status,
            # Succeeded refunds only: the money given back.
            "amount_refunded": {
                currency: _format_amount(minor) for currency, minor in sorted(refunded_minor_by_currency.items())
            },
            "charges_refunded_more_than_charged": [row["id"] for row in over_refunded],
        },
        "idempotency_keys": {"total": sum(keys_by_scope.values()), "in_flight": in_flight, "by_scope": keys_by_scope},
        "webhooks": {
            "total": sum(events_by_status.values()),
            "by_status": events_by_status,
            "attempts": attempt_count,
        },
        "payment_methods": {"total": payment_method_count},
    }


def reset_ledger() -> None:
    """Wipe charges, refunds, shipments, keys and webhook events (for tests); fault settings are reset separately."""
    with db.write() as conn:
        for table in (
            "charges",
            "refunds",
            "shipments",
            "idempotency_keys",
            "webhook_events",
            "webhook_attempts",
            "payment_methods",
        ):
            conn.execute(f"DELETE FROM {table}")  # noqa: S608 (constant table names)
