"""Holds and money: a hold staff resolve must agree with what the provider did."""

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import transaction
from django.test import override_settings

from integrations.errors import ProviderUnavailable
from orders.models import Order
from orders.services import (
    PaymentTaken,
    charge_order,
    fail_held_order,
    hold_stuck_order,
    place_order,
    process_order,
    retry_held_order,
)
from payments import reconciliation, services
from payments.models import Payment, PaymentMismatch, WebhookEvent
from tests.payments.support import deliver_webhook

# broker: eager mode off, so a commit publishes to Redis (no worker) instead of running the whole chain.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]

S = Order.Status
CHARGE = "orders.tasks.charge_order"


def confirmed_order(user, product) -> Order:
    order = place_order(owner=user, items=[(product.sku, 3)])
    return process_order(order_id=order.pk)


def claim(order: Order) -> Payment:
    with transaction.atomic():
        return services.claim_order_payment(order=Order.objects.select_for_update().get(pk=order.pk))


def succeeded_charges(sandbox) -> list[dict]:
    return [charge for charge in sandbox.charges() if charge["status"] == "succeeded"]


@contextmanager
def provider_answering(status: int, body: dict):
    """The provider's front door answering every request with `status` (a rate limit, an auth error)."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length", 0))
            self.rfile.read(length)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with override_settings(PAYMENT_PROVIDER_URL=f"http://127.0.0.1:{server.server_address[1]}"):
            yield
    finally:
        server.shutdown()
        server.server_close()


UNAUTHORIZED = {"error": {"type": "authentication_error", "code": "key_rotated", "message": "Invalid API key."}}
RATE_LIMITED = {"error": {"type": "rate_limit_error", "code": "rate_limited", "message": "Too many requests."}}


# --- A. An order on hold whose payment succeeded -------------------------------------------


def test_fail_held_order_refuses_an_order_whose_payment_succeeded(user, product, sandbox):
    # Given the charge task recorded the provider's success, then failed for good before it moved the order
    # (hard time limit, lost pool process, the database gone for the whole retry window): the outbox's
    # task_failure puts the order on hold.
    order = confirmed_order(user, product)
    payment = services.settle_payment(payment_id=claim(order).pk)
    assert payment.status == Payment.Status.SUCCEEDED
    hold_stuck_order(order_id=order.pk, task_name=CHARGE, reason="TimeLimitExceeded(90.0)")

    # Then the recorded outcome is applied instead of a hold: the order is paid, and cannot be failed
    order.refresh_from_db()
    assert order.status == S.PAID
    with pytest.raises(PaymentTaken):
        fail_held_order(order_id=order.pk)
    order.refresh_from_db()
    payment.refresh_from_db()
    assert (order.status, payment.status) == (S.PAID, Payment.Status.SUCCEEDED)


# --- B. A webhook for a payment in needs_attention -----------------------------------------


def test_a_webhook_reporting_the_charge_of_an_unfinished_payment_settles_it(
    client, user, product, sandbox, webhook_receiver
):
    # Given the provider charged but its answer was lost, and the charge task's retries were spent:
    # the payment needs attention ("unfinished", outcome unknown), the order is on hold.
    order = confirmed_order(user, product)
    payment = claim(order)
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(ProviderUnavailable):
        services.settle_payment(payment_id=payment.pk)
    hold_stuck_order(order_id=order.pk, task_name=CHARGE, reason="ProviderUnavailable: HTTP 503")
    payment.refresh_from_db()
    assert payment.status == Payment.Status.NEEDS_ATTENTION

    # When the provider's signed webhook for that very charge arrives (late: it retries while the shop is down)
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    response = deliver_webhook(client, webhook_receiver, charge_id=charge["id"])
    assert response.status_code == 200
    # What the worker does with the process_webhook item, then the charge step it enqueues.
    services.process_webhook(event_id=WebhookEvent.objects.get().pk)
    charge_order(order_id=order.pk)

    # Then the shop knows the money was taken: the matching, succeeded charge settles the payment
    payment.refresh_from_db()
    order.refresh_from_db()
    assert (payment.status, order.status) == (Payment.Status.SUCCEEDED, S.PAID), (
        f"payment {payment.status}, order {order.status}: the provider's success was dropped"
    )


def test_staff_failing_a_hold_after_the_provider_charged_is_never_silent(user, product, sandbox):
    # Given the same unfinished charge the provider did make
    order = confirmed_order(user, product)
    payment = claim(order)
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(ProviderUnavailable):
        services.settle_payment(payment_id=payment.pk)
    hold_stuck_order(order_id=order.pk, task_name=CHARGE, reason="ProviderUnavailable: HTTP 503")

    charged = [c for c in succeeded_charges(sandbox) if c["reference"] == payment.idempotency_key]
    assert charged, "precondition: the provider holds a succeeded charge for this order"

    # When staff fail the held order
    with pytest.raises(PaymentTaken):
        fail_held_order(order_id=order.pk)

    # Then the provider was asked first: the money it took pays the order, nothing is released or failed
    order.refresh_from_db()
    payment.refresh_from_db()
    assert (order.status, payment.status) == (S.PAID, Payment.Status.SUCCEEDED)
    reconciliation.reconcile_payments()
    assert not PaymentMismatch.objects.exists()


# --- C. A refusal that is not final -------------------------------------------------------


def test_a_rate_limited_charge_is_retried_not_put_on_hold(user, product, sandbox):
    order = confirmed_order(user, product)
    with provider_answering(429, RATE_LIMITED):
        with pytest.raises(ProviderUnavailable):
            charge_order(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == S.CONFIRMED


def test_staff_retry_of_a_refused_charge_never_charges_twice(user, product, sandbox):
    # Given the provider charged under the payment's key, its answer was lost (a retry follows),
    # and the retry met a refusal that says nothing about the charge (a 429 rate limit, a 401 while keys rotate)
    order = confirmed_order(user, product)
    payment = claim(order)
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(ProviderUnavailable):
        services.settle_payment(payment_id=payment.pk)
    with provider_answering(401, UNAUTHORIZED):
        charge_order(order_id=order.pk)
    payment.refresh_from_db()
    order.refresh_from_db()
    assert (payment.status, order.status) == (Payment.Status.NEEDS_ATTENTION, S.ON_HOLD)
    assert payment.failure_reason.startswith("rejected:")

    # When staff retry the held order, as the hold invites them to
    retry_held_order(order_id=order.pk)
    charge_order(order_id=order.pk)

    # Then the shopper is charged once
    order.refresh_from_db()
    mine = [c for c in succeeded_charges(sandbox) if c["amount"] == str(order.total)]
    assert len(mine) == 1, f"{len(mine)} succeeded charges for one order of {order.total}: {mine}"
