"""The sandbox's WSGI application: routing, JSON in and out, idempotency and fault injection around creates.

Serve with `python -m sandbox` (or `gunicorn sandbox.app:application -k gthread --threads 16 -w 1`).
"""

import functools
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from sandbox import db, faults, ledger, webhooks
from sandbox.validation import (
    MAX_BODY_BYTES,
    ValidationError,
    parse_charge,
    parse_faults_update,
    parse_idempotency_key,
    parse_json_object,
    parse_payment_method,
    parse_positive_int_query,
    parse_refund,
    parse_shipment,
)

logger = logging.getLogger("sandbox.app")


@dataclass
class Request:
    environ: dict[str, Any]
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def query(self, name: str) -> str | None:
        values = parse_qs(self.environ.get("QUERY_STRING", ""), keep_blank_values=True).get(name)
        return values[-1] if values else None

    def body(self) -> bytes:
        """The raw body, at most MAX_BODY_BYTES (else 413, before reading a declared oversized body)."""
        declared = self.environ.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _too_large()
        data = self.environ["wsgi.input"].read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            raise _too_large()
        return data


def _too_large() -> ValidationError:
    return ValidationError(None, f"request body exceeds {MAX_BODY_BYTES} bytes", "body_too_large", status=413)


@dataclass
class Response:
    status: int
    body: str | dict[str, Any] | list[Any]
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        text = self.body if isinstance(self.body, str) else json.dumps(self.body, separators=(",", ":"))
        return text.encode()


def _error(status: int, error_type: str, code: str, message: str, **extra: Any) -> Response:
    return Response(status, {"error": {"type": error_type, "code": code, "message": message, **extra}})


# Creates: the fault injection and idempotency shared by charges, refunds and shipments -------------------------


def _front_door_fault(current: faults.Faults) -> Response | None:
    """An injected failure before the provider acts (nothing recorded), or None."""
    injected = faults.decide_front_door_fault(current)
    if injected is faults.InjectedFault.TIMEOUT:
        time.sleep(current.timeout_seconds)
        return _error(504, "api_error", "timeout", "Injected fault: the provider timed out before acting.")
    if injected is not None:
        response = _error(503, "api_error", "service_unavailable", f"Injected fault ({injected}): try again.")
        response.headers["Retry-After"] = "1"
        return response
    return None


def _create(request: Request, *, scope: str, parse: Callable, perform: Callable) -> Response:
    key = parse_idempotency_key(request.header("Idempotency-Key"))
    params = parse(parse_json_object(request.body()))
    current = faults.get_faults()

    # Front-door faults: the provider failed before acting, so nothing is recorded and the key stays free.
    if (fault := _front_door_fault(current)) is not None:
        return fault

    claim = ledger.claim_idempotency_key(scope=scope, key=key, request_fingerprint=ledger.fingerprint(params))
    if claim.outcome is ledger.ClaimOutcome.MISMATCH:
        return _error(
            422,
            "idempotency_error",
            "idempotency_key_reused",
            "This Idempotency-Key was already used with different parameters.",
            field="Idempotency-Key",
        )
    if claim.outcome is ledger.ClaimOutcome.IN_FLIGHT:
        response = _error(
            409,
            "idempotency_error",
            "idempotency_key_in_use",
            "A request with this Idempotency-Key is still in progress; retry later.",
            field="Idempotency-Key",
        )
        response.headers["Retry-After"] = "1"
        return response

    if claim.outcome is ledger.ClaimOutcome.REPLAY:
        time.sleep(current.latency_ms / 1000)
        assert claim.status is not None and claim.body is not None  # a replay carries the stored answer
        return Response(claim.status, claim.body, {"Idempotent-Replayed": "true"})

    completed = False
    try:
        # While the key is claimed, so a concurrent request with the same key meets the claim (409).
        time.sleep(current.latency_ms / 1000)
        created = perform(idempotency_key=key, params=params, current_faults=current)
        completed = True
    except ledger.ProcessingError as exc:
        response = _error(503, "api_error", "processing_error", str(exc))
        response.headers["Retry-After"] = "1"
        return response
    finally:
        if not completed:
            ledger.release_idempotency_key(scope=scope, key=key)
    if created.response_lost:
        return _error(
            500,
            "api_error",
            "response_lost",
            "Injected fault: the request was processed but its response was lost; retry with the same key.",
        )
    return Response(created.status, created.body)


def create_charge(request: Request) -> Response:
    return _create(request, scope=ledger.CHARGES, parse=parse_charge, perform=ledger.create_charge)


def create_refund(request: Request) -> Response:
    return _create(request, scope=ledger.REFUNDS, parse=parse_refund, perform=ledger.create_refund)


def create_shipment(request: Request) -> Response:
    return _create(request, scope=ledger.SHIPMENTS, parse=parse_shipment, perform=ledger.create_shipment)


def create_payment_method(request: Request) -> Response:
    """Tokenise a card (no Idempotency-Key: each call makes a new token, as tokenising a card again does)."""
    today = time.gmtime()
    params = parse_payment_method(parse_json_object(request.body()), this_year=today.tm_year, this_month=today.tm_mon)
    # The front-door faults of creates apply (nothing is kept when one fires).
    if (fault := _front_door_fault(faults.get_faults())) is not None:
        return fault
    return Response(201, ledger.create_payment_method(params=params))


def get_payment_method(request: Request) -> Response:
    found = ledger.get_payment_method(payment_method_id=request.params["payment_method_id"])
    return Response(200, found) if found else _error(404, "not_found", "not_found", "No such payment method.")


# Reads ------------------------------------------------------------------------------------------------------


def _limit(request: Request) -> int:
    raw = request.query("limit")
    if raw is None:
        return ledger.DEFAULT_LIST_LIMIT
    return min(parse_positive_int_query(raw, "limit"), ledger.MAX_LIST_LIMIT)


def _list(data: list[Any]) -> Response:
    return Response(200, {"object": "list", "data": data})


def _page(
    request: Request, fetch: Callable[..., list[dict[str, Any]]], *, unknown_cursor: type[LookupError], noun: str
) -> Response:
    """One page of a Stripe-like list: `starting_after` (the last id seen) and `limit` go to `fetch`, `has_more`.

    A `starting_after` that `fetch` does not know (it raises `unknown_cursor`) is a 400 naming the `noun`.
    """
    limit = _limit(request)
    try:
        # One more than asked for tells whether another page follows.
        items = fetch(starting_after=request.query("starting_after"), limit=limit + 1)
    except unknown_cursor as exc:
        raise ValidationError("starting_after", f"No such {noun}: {exc}", "resource_missing") from None
    return Response(200, {"object": "list", "data": items[:limit], "has_more": len(items) > limit})


def list_charges(request: Request) -> Response:
    """Stripe-like paging: `created_gte` (unix seconds), `starting_after` (the last charge id seen), `has_more`."""
    status = request.query("status")
    if status is not None and status not in ("succeeded", "declined"):
        raise ValidationError("status", "status must be succeeded or declined", "invalid_value")
    raw_created_gte = request.query("created_gte")
    created_gte = None if raw_created_gte is None else parse_positive_int_query(raw_created_gte, "created_gte")
    fetch = functools.partial(
        ledger.list_charges, reference=request.query("reference"), status=status, created_gte=created_gte
    )
    return _page(request, fetch, unknown_cursor=ledger.UnknownCharge, noun="charge")


def get_charge(request: Request) -> Response:
    charge = ledger.get_charge(charge_id=request.params["charge_id"])
    return Response(200, charge) if charge else _error(404, "not_found", "not_found", "No such charge.")


def list_refunds(request: Request) -> Response:
    """Paged as charges are: `starting_after` (the last refund id seen), `has_more`."""
    fetch = functools.partial(
        ledger.list_refunds, charge_id=request.query("charge"), reference=request.query("reference")
    )
    return _page(request, fetch, unknown_cursor=ledger.UnknownRefund, noun="refund")


def get_refund(request: Request) -> Response:
    refund = ledger.get_refund(refund_id=request.params["refund_id"])
    return Response(200, refund) if refund else _error(404, "not_found", "not_found", "No such refund.")


def list_shipments(request: Request) -> Response:
    raw = request.query("order_id")
    order_id = None if raw is None else parse_positive_int_query(raw, "order_id")
    return _list(ledger.list_shipments(order_id=order_id, limit=_limit(request)))


def get_shipment(request: Request) -> Response:
    shipment = ledger.get_shipment(shipment_id=request.params["shipment_id"])
    return Response(200, shipment) if shipment else _error(404, "not_found", "not_found", "No such shipment.")


def list_events(request: Request) -> Response:
    return _list(ledger.list_events(charge_id=request.query("charge_id"), limit=_limit(request)))


def ledger_summary(request: Request) -> Response:
    return Response(200, ledger.summarize_ledger())


# Operations -------------------------------------------------------------------------------------------------


def get_faults(request: Request) -> Response:
    return Response(200, faults.get_faults().as_dict())


def update_faults(request: Request) -> Response:
    changes = parse_faults_update(parse_json_object(request.body()))
    updated = faults.update_faults(changes=changes)
    logger.warning("faults changed: %s -> %s", changes, updated.as_dict())
    return Response(200, updated.as_dict())


def reset(request: Request) -> Response:
    ledger.reset_ledger()
    return Response(200, {"reset": True, "faults": faults.reset_faults().as_dict()})


def healthz(request: Request) -> Response:
    db.connection().execute("SELECT 1 FROM faults LIMIT 1").fetchall()
    return Response(200, {"status": "ok"})


# Routing ----------------------------------------------------------------------------------------------------

Handler = Callable[[Request], Response]
ROUTES: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
    (re.compile(r"/healthz"), {"GET": healthz}),
    (re.compile(r"/v1/charges"), {"POST": create_charge, "GET": list_charges}),
    (re.compile(r"/v1/charges/(?P<charge_id>[^/]+)"), {"GET": get_charge}),
    (re.compile(r"/v1/refunds"), {"POST": create_refund, "GET": list_refunds}),
    (re.compile(r"/v1/refunds/(?P<refund_id>[^/]+)"), {"GET": get_refund}),
    (re.compile(r"/v1/payment_methods"), {"POST": create_payment_method}),
    (re.compile(r"/v1/payment_methods/(?P<payment_method_id>[^/]+)"), {"GET": get_payment_method}),
    (re.compile(r"/v1/shipments"), {"POST": create_shipment, "GET": list_shipments}),
    (re.compile(r"/v1/shipments/(?P<shipment_id>[^/]+)"), {"GET": get_shipment}),
    (re.compile(r"/v1/events"), {"GET": list_events}),
    (re.compile(r"/v1/ledger/summary"), {"GET": ledger_summary}),
    (re.compile(r"/v1/faults"), {"GET": get_faults, "PUT": update_faults, "PATCH": update_faults}),
    (re.compile(r"/v1/reset"), {"POST": reset}),
]


def dispatch(environ: dict[str, Any]) -> Response:
    method = environ.get("REQUEST_METHOD", "GET").upper()
    path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
    for pattern, handlers in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        handler = handlers.get("GET" if method == "HEAD" else method)
        if handler is None:
            response = _error(405, "invalid_request_error", "method_not_allowed", f"{method} is not allowed here.")
            response.headers["Allow"] = ", ".join(handlers)
            return response
        request = Request(environ, method, path, match.groupdict())
        try:
            return handler(request)
        except ValidationError as exc:
            return _error(exc.status, "invalid_request_error", exc.code, exc.message, field=exc.field)
        except sqlite3.OperationalError:
            # Lock contention past the busy timeout, or a full disk: transient for the client, loud in the log.
            logger.exception("ledger unavailable for %s %s", method, path)
            response = _error(503, "api_error", "ledger_unavailable", "The ledger is busy; retry.")
            response.headers["Retry-After"] = "1"
            return response
    return _error(404, "not_found", "not_found", f"No route for {path}.")


def application(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
    # Also started by `python -m sandbox` in each worker; this covers a bare `gunicorn sandbox.app:application`.
    webhooks.deliverer.ensure_started()
    response = dispatch(environ)
    payload = response.encoded()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Cache-Control", "no-store"),
        *response.headers.items(),
    ]
    key = environ.get("HTTP_IDEMPOTENCY_KEY")
    if key and len(key) <= 255 and key.isascii() and key.isprintable():
        headers.append(("Idempotency-Key", key))
    start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [payload]
