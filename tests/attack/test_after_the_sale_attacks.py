"""Attacks on what happens after the sale (issue 16): refunds, cancelling a paid order, expiry, dunning.

Each test is an outsider's move (a double submit, a race, a replay, the provider failing at the wrong
moment, hostile bytes) and the claim that must hold afterwards: money, stock, status, emails, dead letters.
Against the in-process sandbox, eager tasks run after commit (`django_capture_on_commit_callbacks`).
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from notifications.models import Notification
from ops.deadletters import REFUND_FAILED
from ops.models import FailedTask
from orders import services
from orders.models import Order, StockMovement
from orders.services import place_order
from payments import refunds
from payments import services as payment_services
from payments.models import Payment, PaymentMethod, Refund, Subscription, WebhookEvent
from tests.after_sale import bearer, post_refund, refund_now, stock_of
from tests.concurrency import run_concurrently
from tests.factories import PlanFactory, ProductFactory, SubscriptionFactory, UserFactory

pytestmark = pytest.mark.django_db

S = Order.Status
CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"
SUCCEEDS, DECLINES = "4242424242424242", "4000000000000002"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


# --- Helpers and fixtures -------------------------------------------------------------------


# --- A refund claimed while the hand-over is under way ---------------------------------------------


def test_an_order_refunded_in_full_while_its_hand_over_was_under_way_ends_refunded(
    paid, sandbox, django_capture_on_commit_callbacks
):
    """Staff refund everything just after the hand-over claimed its key (the warehouse call in flight).

    The refund succeeds while the order is still `paid`: apply_refund has no paid -> refunded move, so it
    changes nothing; the hand-over then finishes and the order reads `fulfilled` for good, with all of
    its money given back (reports count it as a sale, the shopper's page says fulfilled, staff see
    nothing left to do).
    """
    # Given a hand-over that has begun (its key claimed, the warehouse not answered yet)
    services._claim_hand_over(paid.pk)

    # When staff refund all of it, and the refund succeeds at once
    refund = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk)
    assert refund.status == Refund.Status.SUCCEEDED and refund.amount == Decimal("25.00")
    # and then the warehouse answers
    with django_capture_on_commit_callbacks(execute=True):
        services.sync_to_fulfillment(order_id=paid.pk)

    # Then the order says it was refunded
    paid.refresh_from_db()
    assert paid.status == S.REFUNDED, list(paid.events.values_list("to_status", flat=True))


def test_an_order_partly_refunded_while_its_hand_over_was_under_way_ends_partially_refunded(
    paid, sandbox, django_capture_on_commit_callbacks
):
    """Staff refund a mug just after the hand-over claimed its key: the mug ships (right), 10.00 goes back.

    The refund succeeded while the order was `paid`, so no partially_refunded move was made; once the
    warehouse answers, the order is `fulfilled` and nothing ever says part of it was given back.
    """
    services._claim_hand_over(paid.pk)
    mug = paid.items.get(sku="MUG")
    refund = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk, lines={str(mug.pk): 1})
    assert refund.status == Refund.Status.SUCCEEDED

    with django_capture_on_commit_callbacks(execute=True):
        services.sync_to_fulfillment(order_id=paid.pk)

    paid.refresh_from_db()
    assert paid.status == S.PARTIALLY_REFUNDED, list(paid.events.values_list("to_status", flat=True))


def test_an_order_refunded_in_full_while_held_on_its_way_to_the_warehouse_ends_refunded(
    paid, sandbox, django_capture_on_commit_callbacks
):
    """The warehouse keeps failing (the order on hold, its key claimed); staff refund the shopper in full.

    The refund succeeds while the order is on hold: on_hold has no move to refunded, so apply_refund
    does nothing; when the warehouse comes back, the hand-over (which resumes by itself) makes it
    `fulfilled`, with all of its money given back.
    """
    # Given an order whose hand-over failed for good once and waits on hold for the warehouse
    services._claim_hand_over(paid.pk)
    services.hold_stuck_order(
        order_id=paid.pk, task_name="orders.tasks.sync_to_fulfillment", reason="warehouse down", resumes=True
    )
    paid.refresh_from_db()
    assert paid.status == S.ON_HOLD

    # When staff refund everything and it is given back
    refund = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk)
    assert refund.status == Refund.Status.SUCCEEDED
    # and the warehouse comes back
    with django_capture_on_commit_callbacks(execute=True):
        services.sync_to_fulfillment(order_id=paid.pk)

    paid.refresh_from_db()
    assert paid.status == S.REFUNDED, list(paid.events.values_list("to_status", flat=True))


# --- A line refund the provider refuses ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_line_refund_the_provider_refuses_leaves_the_line_to_ship_and_refundable_again(
    user, products, sandbox, django_capture_on_commit_callbacks, dead_letters_forgotten
):
    """Staff refund one mug of a paid order before the hand-over; the provider refuses the refund.

    Nothing was given back (the refund failed, a dead letter says so), yet the line is counted as
    refunded and its unit is back on the shelf: the shopper paid for two mugs, gets one, and no money;
    staff cannot refund the line again ("more than the 1 not refunded yet").
    """
    order = place_order(owner=user, items=[("MUG", 2), ("TEE", 1)])
    services.process_order(order_id=order.pk)
    services.charge_order(order_id=order.pk)
    # The provider will refuse any refund of this charge (as if it were not refundable there)
    Payment.objects.filter(order=order).update(provider_charge_id="ch_not_at_the_provider")
    mug = order.items.get(sku="MUG")

    refund = refund_now(django_capture_on_commit_callbacks, order_id=order.pk, lines={str(mug.pk): 1})

    assert refund.status == Refund.Status.FAILED
    assert FailedTask.objects.filter(task_name=REFUND_FAILED, args=[refund.pk]).count() == 1
    mug.refresh_from_db()
    # Then the line is not counted as given back: it still ships, or it can be refunded again
    assert mug.refunded_quantity == 0, "a failed refund still counts its unit as refunded"
    services.refund_order(order_id=order.pk, lines={str(mug.pk): 2})  # both mugs refundable again


# --- Requests made again ---------------------------------------------------------------------------


def test_a_retried_api_refund_of_every_line_before_hand_over_answers_with_its_refund(
    paid, staff_api_client, django_capture_on_commit_callbacks
):
    """A client refunds every line of a paid order (before the hand-over) and, its answer lost, sends it again.

    The first request cancelled the order and refunded all that was left (a refund with no lines); the
    retry, same Idempotency-Key and same body, is compared with that refund's (empty) lines and refused
    as a reused key (422), so the client believes nothing was refunded.
    """
    body = {"lines": [{"item_id": item.pk, "quantity": item.quantity} for item in paid.items.all()]}
    with django_capture_on_commit_callbacks(execute=True):
        first = post_refund(staff_api_client, paid, body, key="lines-all-1")
    assert first.status_code == 202, first.content

    again = post_refund(staff_api_client, paid, body, key="lines-all-1")

    assert again.status_code == 202, again.content
    assert again.json()["id"] == first.json()["id"]
    assert Refund.objects.count() == 1


# --- Dunning: the card changed while a try is charging ---------------------------------------------


def _add_card(owner, number: str) -> PaymentMethod:
    return payment_services.add_card(owner=owner, number=number, exp_month=12, exp_year=2040, cvc="123")


def test_a_card_changed_while_the_last_try_is_charging_the_old_card_is_still_tried(
    user, sandbox, time_machine, django_capture_on_commit_callbacks
):
    """The owner of a past-due subscription picks a good card while its last try is charging the bad one.

    The page says "the payment is being tried again with it", but the try in flight holds the old card,
    and its open outbox item makes the card change enqueue nothing: the old card is declined, that was
    the last try, and the subscription is cancelled. The new card is never charged.
    """
    time_machine.move_to(T0)
    plan = PlanFactory(code="dunning-race", price="9.00")
    bad = _add_card(user, DECLINES)
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=T0.date(), payment_method=bad)
    period = T0.date().isoformat()
    # Given three declined tries (the schedule has three retries: this is the last one)
    for attempt in (1, 2, 3):
        payment_services.charge_subscription(subscription_id=subscription.pk, billing_period=period, attempt=attempt)
    subscription.refresh_from_db()
    assert (subscription.status, subscription.failed_attempts) == ("past_due", 3)
    # and the last try enqueued by the sweep, claimed, and charging (the provider slow: no answer yet)
    time_machine.move_to(T0 + 8 * DAY)
    with django_capture_on_commit_callbacks(execute=False):
        assert payment_services.retry_due_renewals() == [(subscription.pk, period, 4)]
    sandbox.set_faults(fail_next=1)
    with pytest.raises(ProviderUnavailable):
        payment_services.charge_subscription(subscription_id=subscription.pk, billing_period=period, attempt=4)
    assert subscription.payments.get(attempt=4).status == Payment.Status.PROCESSING

    # When the owner changes to a good card
    good = _add_card(user, SUCCEEDS)
    with django_capture_on_commit_callbacks(execute=True):
        payment_services.set_subscription_payment_method(
            owner=user, subscription_id=subscription.pk, payment_method_id=good.pk
        )
    # and the try in flight gets its answer (its retry)
    with django_capture_on_commit_callbacks(execute=True):
        payment_services.charge_subscription(subscription_id=subscription.pk, billing_period=period, attempt=4)

    # Then the good card was tried before giving up
    subscription.refresh_from_db()
    charged_cards = set(subscription.payments.values_list("payment_method_id", flat=True))
    assert good.pk in charged_cards, "the new card was never charged"
    assert subscription.status != Subscription.Status.CANCELLED


# --- Refund webhooks: replays, foreign refunds, races ------------------------------------------------

WEBHOOK_URL = "/payments/webhooks/provider/"


def _deliver(client: Client, hook):
    return client.post(
        WEBHOOK_URL,
        data=hook.body,
        content_type="application/json",
        HTTP_SANDBOX_SIGNATURE=hook.headers["Sandbox-Signature"],
    )


def _refund_hook(webhook_receiver, provider_refund_id: str):
    [hook] = webhook_receiver.wait_for(
        lambda event: event["type"].startswith("refund.") and event["data"]["refund"]["id"] == provider_refund_id
    )
    return hook


def test_a_refund_made_by_someone_else_under_our_refunds_reference_does_not_fail_ours(
    fulfilled, sandbox, client, webhook_receiver, django_capture_on_commit_callbacks
):
    """Another client of the provider refunds one of its own charges with our refund's reference (references are
    free text there: only the idempotency key is ours) before our refund task has run; its event reaches us.

    process_refund_event finds our refund by reference alone and records the foreign refund onto it: a
    mismatch, so ours is marked `failed` (a dead letter, refundable again) and its task, finding it final,
    never asks the provider. The shopper is not refunded; had our call already gone through, staff
    refunding "again" would give the money back twice.
    """
    # Given our refund, claimed, its task not run yet
    with django_capture_on_commit_callbacks(execute=False):
        ours = services.refund_order(order_id=fulfilled.pk, amount="10.00")
    # When someone else refunds their own charge under our reference, and the provider tells us
    assert sandbox.charge(key="theirs-1", reference="their-order", amount="10.00").status_code in (200, 201)
    [their_charge] = sandbox.charges(reference="their-order")
    made = sandbox.post(
        "/v1/refunds",
        {"charge": their_charge["id"], "amount": "10.00", "currency": "EUR", "reference": ours.idempotency_key},
        key="their-refund-key",
    )
    assert made.status_code in (200, 201), made.text
    with django_capture_on_commit_callbacks(execute=True):
        assert _deliver(client, _refund_hook(webhook_receiver, made.json()["id"])).status_code == 200

    # Then our refund is still ours to make, and is made
    ours.refresh_from_db()
    assert ours.status == Refund.Status.REQUESTED, (ours.status, ours.failure_reason)
    assert refunds.settle_refund(refund_id=ours.pk).status == Refund.Status.SUCCEEDED


def test_a_refund_webhook_delivered_twice_and_late_changes_nothing_more(
    fulfilled, sandbox, client, webhook_receiver, django_capture_on_commit_callbacks
):
    """The provider's refund.succeeded event is delivered twice, after the refund task already recorded it.

    Holds: one refund, one of each refund email, one status change, nothing asked of the provider again.
    """
    refund = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="10.00")
    assert refund.status == Refund.Status.SUCCEEDED
    hook = _refund_hook(webhook_receiver, refund.provider_refund_id)
    events_before = fulfilled.events.count()

    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            assert _deliver(client, hook).status_code == 200

    refund.refresh_from_db()
    assert (refund.status, refund.attempts) == (Refund.Status.SUCCEEDED, 1)
    assert fulfilled.events.count() == events_before
    for kind in ("refund_requested", "refund_succeeded"):
        assert Notification.objects.filter(kind=kind, object_id=refund.pk).count() == 1


def test_an_older_refund_webhook_after_a_newer_one_moves_nothing_back(
    fulfilled, sandbox, client, webhook_receiver, django_capture_on_commit_callbacks
):
    """Two refunds (10.00, then the rest); their events arrive newest first.

    Holds: the order ends refunded, not partially_refunded, and each refund succeeded once.
    """
    first = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="10.00")
    rest = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk)
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.REFUNDED

    for refund in (rest, first):
        with django_capture_on_commit_callbacks(execute=True):
            assert _deliver(client, _refund_hook(webhook_receiver, refund.provider_refund_id)).status_code == 200

    fulfilled.refresh_from_db()
    assert fulfilled.status == S.REFUNDED
    assert fulfilled.events.filter(to_status=S.REFUNDED).count() == 1
    assert Refund.objects.filter(status=Refund.Status.SUCCEEDED).count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_refund_racing_its_own_webhook_records_once_and_emails_once(
    user, products, sandbox, webhook_receiver, django_capture_on_commit_callbacks
):
    """The refund task's answer was lost; its retry and the provider's webhook record it at the same moment."""
    order = place_order(owner=user, items=[("MUG", 2), ("TEE", 1)])  # eager: fulfilled as it commits
    order.refresh_from_db()
    assert order.status == S.FULFILLED
    # A claimed refund whose task has not run (written as claim_refund writes it, without its outbox item)
    refund = Refund.objects.create(
        payment=order.payments.get(), amount=Decimal("10.00"), idempotency_key=refunds.new_refund_key()
    )
    sandbox.set_faults(fail_after_refund_next=1)
    with pytest.raises(ProviderUnavailable):
        refunds.settle_refund(refund_id=refund.pk)
    [made] = sandbox.get("/v1/refunds", reference=refund.idempotency_key).json()["data"]
    hook = _refund_hook(webhook_receiver, made["id"])

    def work(i: int) -> int:
        if i == 0:
            return refunds.settle_refund(refund_id=refund.pk).pk
        return (
            Client()
            .post(
                WEBHOOK_URL,
                data=hook.body,
                content_type="application/json",
                HTTP_SANDBOX_SIGNATURE=hook.headers["Sandbox-Signature"],
            )
            .status_code
        )

    run_concurrently(2, work)

    refund.refresh_from_db()
    order.refresh_from_db()
    assert refund.status == Refund.Status.SUCCEEDED and refund.provider_refund_id == made["id"]
    assert order.status == S.PARTIALLY_REFUNDED
    assert order.events.filter(to_status=S.PARTIALLY_REFUNDED).count() == 1
    assert Notification.objects.filter(kind="refund_succeeded", object_id=refund.pk).count() == 1
    assert len(sandbox.get("/v1/refunds", reference=refund.idempotency_key).json()["data"]) == 1


# --- Races between the shopper and staff -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_shopper_cancel_racing_a_staff_refund_gives_back_the_charge_once_and_the_stock_once(user, products, sandbox):
    """The shopper cancels a paid order while staff refund one mug and, separately, everything left."""
    # Committed as it goes (eager tasks): it ends fulfilled; put back to paid, its hand-over not begun.
    order = place_order(owner=user, items=[("MUG", 2), ("TEE", 1)])
    Order.objects.filter(pk=order.pk).update(status=S.PAID, fulfillment_key="")
    assert (stock_of("MUG"), stock_of("TEE")) == (8, 9)
    mug = order.items.get(sku="MUG")

    def work(i: int) -> str:
        try:
            if i == 0:
                services.cancel_order(order_id=order.pk, owner=user)
            elif i == 1:
                services.refund_order(order_id=order.pk, lines={str(mug.pk): 1}, submission="staff-lines")
            else:
                services.refund_order(order_id=order.pk, submission="staff-all")
        except (services.OrderNotCancellable, services.InvalidRefundLines, refunds.RefundError):
            return "refused"
        return "done"

    run_concurrently(3, work)

    payment = Payment.objects.get(order=order)
    assert refunds.refunded(payment) == payment.amount == Decimal("25.00")
    assert (stock_of("MUG"), stock_of("TEE")) == (10, 10)
    order.refresh_from_db()
    assert order.status in (S.CANCELLED, S.REFUNDED)  # refunded once the eager refund tasks ran
    released = sum(StockMovement.objects.filter(order=order, kind="released").values_list("delta", flat=True))
    assert released == 3


# --- Dunning: what the owner is told -----------------------------------------------------------------


def test_a_card_change_on_a_subscription_past_due_without_a_decline_is_not_promised_a_retry(
    user, sandbox, time_machine, client, django_capture_on_commit_callbacks
):
    """A renewal failed for good without a decline (the provider away for its whole retry window): past due,
    no declined try. The owner changes the card on the subscriptions page.

    The page says "The payment is being tried again with it", but set_subscription_payment_method only
    retries after a decline (failed_attempts >= 1): nothing is charged, ever (bill_due skips past-due
    subscriptions, the sweep needs a decline). The owner believes it is being paid.
    """
    time_machine.move_to(T0)
    plan = PlanFactory(code="stuck-past-due", name="Stuck", price="9.00")
    card = _add_card(user, SUCCEEDS)
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=T0.date(), payment_method=card)
    Subscription.objects.filter(pk=subscription.pk).update(status=Subscription.Status.PAST_DUE)
    Payment.objects.create(
        subscription=subscription,
        billing_period=T0.date().isoformat(),
        amount=plan.price,
        idempotency_key="pay_lost_for_good",
        status=Payment.Status.NEEDS_ATTENTION,
        payment_method=card,
    )
    other = _add_card(user, SUCCEEDS)
    client.force_login(user)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/subscriptions/{subscription.pk}/card/", {"payment_method": other.pk}, follow=True)

    said = " ".join(str(message) for message in response.context["messages"])
    tried = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION).exists()
    assert tried or "tried again" not in said, f"told {said!r}, and nothing was tried"


# --- The admin's refund form sent again ---------------------------------------------------------------


def test_the_admin_every_line_form_sent_twice_says_it_was_sent_not_that_nothing_was_refunded(
    client, paid, sandbox, django_capture_on_commit_callbacks
):
    """Staff refund every line of a paid order (before the hand-over) from its page and double-click.

    The first post cancelled the order and refunded all of it (a refund without lines); the second, same
    token, is compared with that refund's lines and refused as a reused key: staff read "Nothing was
    refunded" in red, and may well refund it another way.
    """
    staff = UserFactory(username="support-bob", is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="orders", codename__in=["view_order", "change_order"])
    )
    client.force_login(staff)
    form = {"kind": "lines", "submission": "a" * 32, "note": ""}
    form.update({f"line_{item.pk}": str(item.quantity) for item in paid.items.all()})
    url = reverse("admin:orders_order_refund", args=[paid.pk])

    with django_capture_on_commit_callbacks(execute=True):
        client.post(url, form)
    with django_capture_on_commit_callbacks(execute=True):
        again = client.post(url, form, follow=True)

    said = [str(message) for message in again.context["messages"]]
    assert Refund.objects.count() == 1
    assert not any("Nothing was refunded" in message for message in said), said
    assert any("already sent" in message for message in said), said


# --- Hostile bytes at the doors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "refund_id",
    ["re_" + "0" * 24, "../charges/ch_x"],
)
def test_a_refund_event_naming_a_refund_the_provider_does_not_have_is_stored_invalid(sandbox, refund_id):
    """A (signed) refund event names a refund id the provider does not know, or hostile bytes as one.

    Holds: the event is refused as invalid (InvalidWebhookEvent, an ApplicationError) and stored so,
    not left `received` with a bare ProviderRejected (the provider's 404) that fails the task, which the
    outbox then resumes every WEBHOOK_RESUME_SECONDS up to OUTBOX_MAX_ATTEMPTS times before a dead letter.
    (The id is quoted into the provider's URL: "../charges/ch_x" does not reach a charge.)
    """
    event = WebhookEvent.objects.create(
        provider_event_id=f"evt_{abs(hash(refund_id))}",
        type="refund.succeeded",
        payload={"type": "refund.succeeded", "data": {"refund": {"id": refund_id}}},
    )

    with pytest.raises(payment_services.InvalidWebhookEvent):
        payment_services.process_webhook(event_id=event.pk)

    event.refresh_from_db()
    assert event.status == WebhookEvent.Status.INVALID


@pytest.mark.parametrize("ids", [(2**63, 1), (1, 2**63), (10**30, 10**30), (-1, 1)])
def test_the_subscription_card_endpoint_answers_hostile_ids_with_a_4xx(user, ids):
    """The card endpoint's path ids beyond bigint or negative: a 404/422, never a 500."""
    client = bearer(user)
    response = client.put(f"/api/subscriptions/{ids[0]}/payment-method/{ids[1]}/")
    assert 400 <= response.status_code < 500, response.content


@pytest.mark.parametrize("card", [str(2**63), str(10**40), "1e3", "\x00", "-5"])
def test_the_subscription_card_form_answers_hostile_cards_without_a_500(user, client, card):
    plan = PlanFactory(code="hostile-card", price="9.00")
    subscription = SubscriptionFactory(owner=user, plan=plan)
    client.force_login(user)
    response = client.post(f"/subscriptions/{subscription.pk}/card/", {"payment_method": card})
    assert response.status_code in (302, 404), response.status_code


@pytest.mark.parametrize(
    "key",
    ["k" * 64, "refund-" + "9" * 57],
)
def test_a_refund_key_of_the_longest_size_refunds_once(
    fulfilled, staff_api_client, key, django_capture_on_commit_callbacks
):
    """The longest Idempotency-Key the API takes is stored whole: a retry finds its refund."""
    with django_capture_on_commit_callbacks(execute=True):
        first = post_refund(staff_api_client, fulfilled, {"amount": "1.00"}, key=key)
    again = post_refund(staff_api_client, fulfilled, {"amount": "1.00"}, key=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["id"] == again.json()["id"] and Refund.objects.count() == 1


# --- Expiry racing the charge; a subscription cancel racing its retry --------------------------------


@pytest.mark.django_db(transaction=True)
def test_expiry_racing_the_charge_never_keeps_money_for_an_expired_order(sandbox, broker):
    """The reservation runs out while the charge is at the provider (slow): each round, one of them wins.

    Holds: a paid order keeps its charge and its stock; an expired one gave its stock back and, when the
    provider took the money, refunds all of it, once.
    """
    sandbox.set_faults(latency_ms=150)
    product = ProductFactory(sku="RACE-EXP", price="5.00", stock=100)
    for _ in range(6):
        owner = UserFactory()
        order = services.process_order(order_id=place_order(owner=owner, items=[("RACE-EXP", 2)]).pk)

        def act(i: int, order=order) -> object:
            if i == 0:
                return services.charge_order(order_id=order.pk)
            return services.expire_order(order_id=order.pk)

        run_concurrently(2, act)
        order.refresh_from_db()
        payment = Payment.objects.filter(order=order).first()
        taken = payment is not None and any(
            charge["status"] == "succeeded" for charge in sandbox.charges(reference=payment.idempotency_key)
        )
        if order.status == S.PAID:
            assert taken and not Refund.objects.filter(payment=payment).exists()
        else:
            assert order.status == S.EXPIRED, order.status
            if taken:
                assert payment.status == Payment.Status.SUCCEEDED
                assert list(Refund.objects.filter(payment=payment).values_list("amount", "reason")) == [
                    (payment.amount, Refund.Reason.PAID_AFTER_EXPIRY)
                ]
    product.refresh_from_db()
    assert product.stock == 100 - 2 * Order.objects.filter(status=S.PAID).count()


@pytest.mark.django_db(transaction=True)
def test_a_subscription_cancel_racing_its_retry_never_charges_silently(sandbox, broker):
    """The owner cancels a past-due subscription while its second try is charging a good card."""
    plan = PlanFactory(code="race-retry", name="Race retry", price="9.00")
    today = datetime.now(UTC).date()
    for _ in range(5):
        owner = UserFactory()
        bad = _add_card(owner, DECLINES)
        subscription = SubscriptionFactory(owner=owner, plan=plan, current_period_start=today, payment_method=bad)
        payment_services.charge_subscription(subscription_id=subscription.pk, billing_period=today.isoformat())
        subscription.refresh_from_db()
        assert subscription.failed_attempts == 1
        Subscription.objects.filter(pk=subscription.pk).update(payment_method=_add_card(owner, SUCCEEDS))
        sandbox.set_faults(latency_ms=150)

        def act(i: int, subscription=subscription, owner=owner) -> object:
            if i == 0:
                return payment_services.charge_subscription(
                    subscription_id=subscription.pk, billing_period=today.isoformat(), attempt=2
                )
            return payment_services.cancel_subscription(subscription_id=subscription.pk, owner=owner)

        _, outcome = run_concurrently(2, act)
        sandbox.set_faults(latency_ms=0)
        retry = Payment.objects.filter(subscription=subscription, attempt=2).first()
        charged = retry is not None and any(
            charge["status"] == "succeeded" for charge in sandbox.charges(reference=retry.idempotency_key)
        )
        if charged:
            assert retry.status in (Payment.Status.SUCCEEDED, Payment.Status.NEEDS_ATTENTION)
            if retry.status == Payment.Status.NEEDS_ATTENTION:
                assert outcome.voided_charge
        subscription.refresh_from_db()
        assert subscription.status == Subscription.Status.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_a_shopper_cancelling_as_the_reservation_runs_out_releases_the_stock_once(user, products):
    """The shopper presses cancel the moment the order's payment deadline fires: both release stock.

    Whichever takes the order's lock first ends it (cancelled or expired); the other finds it ended
    and gives nothing back a second time.
    """
    for _ in range(5):
        order = place_order(owner=user, items=[("MUG", 3)])
        services.process_order(order_id=order.pk)
        Payment.objects.filter(order=order).delete()  # eager tasks ran the charge: start from confirmed, unpaid
        Order.objects.filter(pk=order.pk).update(status=S.CONFIRMED)

        def work(i: int, order_id: int = order.pk) -> str:
            if i == 0:
                return services.expire_order(order_id=order_id).status
            try:
                return services.cancel_order(order_id=order_id, owner=user).status
            except services.OrderNotCancellable:
                return "refused"

        outcomes = sorted(run_concurrently(2, work))
        assert outcomes in (["cancelled", "cancelled"], ["expired", "refused"]), outcomes
        released = StockMovement.objects.filter(order=order, kind=StockMovement.Kind.RELEASED)
        assert sum(released.values_list("delta", flat=True)) == 3
