"""Review of issue 18 (commit 3d16546): fewer round trips in the charge, the hand-over and the reservation.

Hostile review: races, lock order, crashes, the card, attempts, SQLite. Each test states the behaviour the
pipeline must keep. The first one fails on 3d16546 (and passes on 5298cae): the reservation's
SELECT ... FOR UPDATE on products conflicts with the FOR KEY SHARE lock an INSERT of an order line takes on
its product (its foreign key check), which the old conditional UPDATE (FOR NO KEY UPDATE) never did; fixed
by locking them FOR NO KEY UPDATE (select_for_update(no_key=True)). The others pass: they guard the risks
the change took (said in each).
"""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from config.celery import app
from integrations import provider
from integrations.errors import ProviderUnavailable
from orders import services
from orders.models import Order, Product, StockMovement
from payments import services as payment_services
from payments.models import Payment, Refund, WebhookEvent
from tests.concurrency import run_concurrently
from tests.factories import PaymentMethodFactory, ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

CHARGE = "orders.tasks.charge_order"


@pytest.fixture(autouse=True)
def steps_are_published_not_run(monkeypatch):
    """Each hop is run here, by the test: what a hop dispatches goes to the (memory) broker and stays there."""
    monkeypatch.setitem(app.conf, "task_always_eager", False)


def confirmed_order(owner=None, payment_method=None, prefix="REV") -> Order:
    ProductFactory(sku=f"{prefix}-1", stock=10)
    ProductFactory(sku=f"{prefix}-2", stock=10)
    order = services.place_order(
        owner=owner or UserFactory(),
        items=[(f"{prefix}-1", 1), (f"{prefix}-2", 2)],
        payment_method_id=payment_method.pk if payment_method else None,
    )
    services.process_order(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == Order.Status.CONFIRMED
    return order


# --- 1. The reservation's FOR UPDATE on products (FAILS on 3d16546) ----------------------------------------


def test_a_reservation_and_a_shopper_placing_an_order_for_the_same_products_do_not_deadlock():
    """process_order (reserve_for_order) now locks its products with SELECT ... FOR UPDATE, in pk order.
    FOR UPDATE conflicts with FOR KEY SHARE, the lock PostgreSQL's foreign key check takes on a product for
    every order line inserted (place_order's bulk_create, one row at a time, in sku order). The old
    conditional UPDATE took FOR NO KEY UPDATE, which does not conflict with it: shoppers never waited on a
    reservation, and could not deadlock with one.

    Products: ZZ (lower pk, later sku) and AA. A reservation of another order holds ZZ for a moment (as any
    reservation of a popular product does). Meanwhile the reservation of order X ([AA, ZZ]) queues for ZZ,
    and a shopper places order Y ([AA, ZZ]): its line for AA takes AA's key-share lock, its line for ZZ queues
    behind X. When ZZ is free, X takes it and asks for AA: X waits on Y, Y on X. PostgreSQL kills one of
    them (deadlock detected): a shopper's checkout fails with a 500, or the reservation task errors.
    Fix: select_for_update(no_key=True) (FOR NO KEY UPDATE), the lock the UPDATE it replaces took.
    """
    zz = ProductFactory(sku="ZZ-LATE-SKU", stock=10)
    aa = ProductFactory(sku="AA-EARLY-SKU", stock=10)
    assert zz.pk < aa.pk
    holder = services.place_order(owner=UserFactory(), items=[("ZZ-LATE-SKU", 1)])
    order = services.place_order(owner=UserFactory(), items=[("AA-EARLY-SKU", 1), ("ZZ-LATE-SKU", 1)])
    shopper = UserFactory()
    holding, release = threading.Event(), threading.Event()

    def hold_the_product(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if '"orders_product"' in sql and not holding.is_set():
            # The reservation has its product (SELECT ... FOR UPDATE now, UPDATE before): a moment of work.
            holding.set()
            assert release.wait(15)
        return result

    def work(i: int) -> str:
        if i == 0:
            with connection.execute_wrapper(hold_the_product):
                return services.process_order(order_id=holder.pk).status
        assert holding.wait(10)
        if i == 1:
            return services.process_order(order_id=order.pk).status  # queues for ZZ
        time.sleep(0.5)  # after the reservation of X queued
        placed = services.place_order(owner=shopper, items=[("AA-EARLY-SKU", 2), ("ZZ-LATE-SKU", 2)])
        return placed.status

    def release_later() -> None:
        assert holding.wait(10)
        time.sleep(1.2)  # X and Y both wait now
        release.set()

    releaser = threading.Thread(target=release_later)
    releaser.start()
    try:
        statuses = run_concurrently(3, work, timeout=30)
    finally:
        release.set()
        releaser.join()
    assert statuses == [Order.Status.CONFIRMED, Order.Status.CONFIRMED, Order.Status.PENDING]
    assert dict(Product.objects.values_list("sku", "stock")) == {"ZZ-LATE-SKU": 8, "AA-EARLY-SKU": 9}


# --- 2. The charge: passing tests that guard what the change risked ----------------------------------------


def test_two_deliveries_of_a_charge_at_once_charge_once_and_count_every_provider_call(monkeypatch, sandbox):
    """Guards: attempts counted in the claim (attempts=1) and not again for the claimer; the loser, which finds
    the payment processing under the lock, counts its own call. One charge at the provider, attempts equal to
    the calls made, the order paid once."""
    order = confirmed_order()
    calls = []
    real_charge = provider.charge

    def counting_charge(**kwargs):
        calls.append(kwargs["idempotency_key"])
        time.sleep(0.3)  # both deliveries reach the provider
        return real_charge(**kwargs)

    def deliver(i: int) -> str:
        try:
            return services.charge_order(order_id=order.pk).status
        except ProviderUnavailable:
            # The provider answers a request under a key still in progress with 409 (the sandbox's claim): the
            # delivery is retried, as the task's autoretry does.
            return services.charge_order(order_id=order.pk).status

    monkeypatch.setattr("payments.services.provider.charge", counting_charge)
    statuses = run_concurrently(2, deliver)
    payment = Payment.objects.get(order=order)
    assert statuses == [Order.Status.PAID, Order.Status.PAID]
    assert (payment.status, payment.attempts) == (Payment.Status.SUCCEEDED, len(calls))
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
    assert list(order.events.values_list("to_status", flat=True)) == ["pending", "confirmed", "paid"]


def test_a_webhook_recorded_while_the_charge_step_is_at_the_provider_leaves_one_paid_move(monkeypatch, sandbox):
    """Guards: the step records and moves in one transaction, with the payment read as it is then (not as it was
    claimed). The webhook for the same charge records it first; the step finds it final and the order moves to
    paid once."""
    order = confirmed_order()
    real_charge = provider.charge

    def charge_then_webhook(**kwargs):
        charge = real_charge(**kwargs)
        event = WebhookEvent.objects.create(
            provider_event_id=f"evt_{charge.id}",
            type="charge.succeeded",
            payload={"id": f"evt_{charge.id}", "type": "charge.succeeded", "data": {"charge": {"id": charge.id}}},
        )
        payment_services.process_webhook(event_id=event.pk)
        return charge

    monkeypatch.setattr("payments.services.provider.charge", charge_then_webhook)
    assert services.charge_order(order_id=order.pk).status == Order.Status.PAID
    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.attempts) == (Payment.Status.SUCCEEDED, 1)
    assert list(order.events.values_list("to_status", flat=True)) == ["pending", "confirmed", "paid"]
    # The step the webhook dispatched finds it done.
    assert services.charge_order(order_id=order.pk).status == Order.Status.PAID
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1


def test_an_order_expired_while_its_charge_is_at_the_provider_is_refunded_by_the_step(monkeypatch, sandbox):
    """Guards: the outcome and the order's move commit together under the order's lock, taken first: the expiry
    that won the lock meanwhile is seen, and the late success is refunded (not a paid move of an expired order)."""
    order = confirmed_order()
    real_charge = provider.charge

    def charge_while_expiring(**kwargs):
        charge = real_charge(**kwargs)
        assert run_concurrently(1, lambda i: services.expire_order(order_id=order.pk).status) == ["expired"]
        return charge

    monkeypatch.setattr("payments.services.provider.charge", charge_while_expiring)
    assert services.charge_order(order_id=order.pk).status == Order.Status.EXPIRED
    payment = Payment.objects.get(order=order)
    assert payment.status == Payment.Status.SUCCEEDED
    assert Refund.objects.filter(payment=payment, reason=Refund.Reason.PAID_AFTER_EXPIRY).count() == 1
    # Stock released once (by the expiry), not again.
    assert dict(Product.objects.values_list("sku", "stock")) == {"REV-1": 10, "REV-2": 10}


def fake_charge(seen: list):
    def charge(**kwargs):
        seen.append(kwargs)
        return provider.Charge(
            id=f"ch_{len(seen)}",
            status="succeeded",
            amount=kwargs["amount"],
            currency=kwargs["currency"],
            reference=kwargs["reference"],
            idempotency_key=kwargs["idempotency_key"],
        )

    return charge


def test_the_charge_uses_the_orders_card_at_the_claim_and_the_payments_card_on_a_redelivery(monkeypatch):
    """Guards: the card now comes from the order as locked (select_related) into the claim and is given to the
    provider without a read; a redelivery charges the card stored on the payment."""
    owner = UserFactory()
    card = PaymentMethodFactory(owner=owner)
    order = confirmed_order(owner=owner, payment_method=card)
    seen: list = []
    monkeypatch.setattr("payments.services.provider.charge", lambda **kwargs: seen.append(kwargs) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        services.charge_order(order_id=order.pk)  # dies at the provider, after its claim
    payment = Payment.objects.get(order=order)
    assert (payment.payment_method_id, payment.attempts) == (card.pk, 1)
    assert seen[0]["payment_method"] == card.provider_token

    monkeypatch.setattr("payments.services.provider.charge", fake_charge(seen))
    assert services.charge_order(order_id=order.pk).status == Order.Status.PAID
    assert [call["payment_method"] for call in seen] == [card.provider_token, card.provider_token]
    assert [call["idempotency_key"] for call in seen] == [payment.idempotency_key] * 2
    assert Payment.objects.get(order=order).attempts == 2


def test_a_crash_while_recording_leaves_neither_the_payment_nor_the_order_moved_and_a_redelivery_finishes(
    monkeypatch,
):
    """Guards: record and move are one transaction now; a crash in the move (after the record) undoes both, so
    no succeeded payment sits beside a confirmed order; the redelivery asks again with the same key."""
    order = confirmed_order()
    seen: list = []
    monkeypatch.setattr("payments.services.provider.charge", fake_charge(seen))
    with monkeypatch.context() as patch:
        patch.setattr("orders.pipeline.set_status", lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed")))
        with pytest.raises(SystemExit):
            services.charge_order(order_id=order.pk)
    payment = Payment.objects.get(order=order)
    assert (payment.status, Order.objects.get(pk=order.pk).status) == (Payment.Status.PROCESSING, "confirmed")
    assert services.charge_order(order_id=order.pk).status == Order.Status.PAID
    assert Payment.objects.get(order=order).status == Payment.Status.SUCCEEDED
    assert len({call["idempotency_key"] for call in seen}) == 1


# --- 3. The hand-over: what is shipped is decided under the order's lock ------------------------------------


def test_a_line_refund_racing_the_start_of_the_hand_over_either_is_not_shipped_or_keeps_its_stock_counted(
    sandbox, django_capture_on_commit_callbacks
):
    """Guards: the key and the lines to ship are decided in one transaction under the order's lock. A refund of
    a line either comes first (its units go back on hand and are not shipped) or after (nothing goes back on
    hand, the units ship): never both shipped and back on hand, never neither."""
    order = confirmed_order()
    services.charge_order(order_id=order.pk)
    line = order.items.get(sku="REV-2")

    def work(i: int) -> object:
        if i == 0:
            return services._claim_hand_over(order.pk)[1]
        return services.refund_order(order_id=order.pk, lines={str(line.pk): 1}, submission="race")

    items, _ = run_concurrently(2, work)
    released = sum(
        StockMovement.objects.filter(
            order=order, kind=StockMovement.Kind.RELEASED, product_id=line.product_id
        ).values_list("delta", flat=True)
    )
    shipped = {item["sku"]: item["quantity"] for item in items}
    assert shipped["REV-1"] == 1
    assert shipped["REV-2"] + released == 2
    # Stock on hand agrees: what is not shipped is back.
    assert Product.objects.get(pk=line.product_id).stock == 10 - shipped["REV-2"]


# --- 4. SQLite (make run): select_for_update(of=...) and bulk_update ---------------------------------------

SQLITE_SCRIPT = textwrap.dedent(
    """
    import django
    django.setup()
    from unittest import mock
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    from decimal import Decimal
    from django.contrib.auth.models import User
    from integrations import provider, warehouse
    from orders import services
    from orders.models import Order, Product
    from payments.models import Payment, PaymentMethod

    shipped = []
    def charge(**kw):
        assert kw["payment_method"] == "pm_sqlite"
        return provider.Charge(id="ch_1", status="succeeded", amount=kw["amount"], currency=kw["currency"],
                               reference=kw["reference"], idempotency_key=kw["idempotency_key"])
    with mock.patch("core.outbox.enqueue"), mock.patch("integrations.provider.charge", charge), \\
            mock.patch("integrations.warehouse.create_shipment",
                       lambda **kw: shipped.append(kw["items"]) or warehouse.Shipment(id="s1", status="created")):
        user = User.objects.create(username="x")
        card = PaymentMethod.objects.create(owner=user, provider_token="pm_sqlite", brand="visa", last4="4242",
                                            exp_month=1, exp_year=2040)
        Product.objects.create(sku="A", name="A", price=Decimal("2.00"), stock=5)
        Product.objects.create(sku="B", name="B", price=Decimal("3.00"), stock=1)
        order = services.place_order(owner=user, items=[("A", 2), ("B", 1)], payment_method_id=card.pk)
        short = services.place_order(owner=user, items=[("A", 1), ("B", 2)])
        services.process_order(order_id=order.pk)
        services.process_order(order_id=short.pk)
        services.charge_order(order_id=order.pk)
        services.sync_to_fulfillment(order_id=order.pk)
        print(Order.objects.get(pk=order.pk).status, Order.objects.get(pk=short.pk).status,
              sorted(Product.objects.values_list("sku", "stock")), Payment.objects.get().attempts, shipped)
    """
)


def test_make_runs_sqlite_reserves_charges_and_hands_over(tmp_path):
    """Guards: select_for_update(of=("self",)) with select_related, bulk_update and the released-units subquery
    on SQLite with IMMEDIATE transactions (make run). Passes: Django skips FOR UPDATE there."""
    script = tmp_path / "run.py"
    script.write_text(SQLITE_SCRIPT)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DEBUG": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "REDIS_URL": "",
        "RUN_ENV_FILE": "",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "fulfilled rejected [('A', 3), ('B', 0)] 1 [[{'sku': 'A', 'quantity': 2}, {'sku': 'B', 'quantity': 1}]]"
    )
