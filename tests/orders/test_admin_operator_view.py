"""The operator view: an order's admin page shows all that happened to it and acts through its services.

Staff refund from the page against the sandbox (the refund's task runs after commit in this
process, `django_capture_on_commit_callbacks`); the page's forms carry a one-time token.
"""

import html
import re
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse

from core.models import OutboxItem
from notifications.models import Notification
from ops.deadletters import REFUND_FAILED
from orders import services
from orders.models import Order, OrderItem, Product
from orders.services import place_order
from payments.models import Refund
from tests.concurrency import run_concurrently
from tests.factories import (
    FailedTaskFactory,
    OrderEventFactory,
    OrderFactory,
    OrderItemFactory,
    ProductFactory,
    RefundFactory,
    UserFactory,
)
from tests.staff import staff_client

pytestmark = pytest.mark.django_db

S = Order.Status


def support_client(client: Client, *codenames: str) -> Client:
    """`client` signed in as the support agent support-ann, with these orders permissions."""
    return staff_client(client, "orders", *codenames, username="support-ann")


@pytest.fixture
def support(client):
    """A support agent who may see and act on orders (not a superuser)."""
    return support_client(client, "view_order", "change_order")


def page_url(order: Order) -> str:
    return reverse("admin:orders_order_change", args=[order.pk])


def refund_url(order: Order) -> str:
    return reverse("admin:orders_order_refund", args=[order.pk])


def token(page, kind: str) -> str:
    """The one-time token of one of the page's refund forms ("all", "amount", "lines")."""
    match = re.search(rf'name="submission" value="([0-9a-f]{{32}})" id="id_refund_{kind}_submission"', page.text)
    assert match, f"no {kind} refund form on the page"
    return match.group(1)


def messages_of(response) -> list[str]:
    """The messages the page shows, read from its HTML: `response.context` collects every template rendered in the
    process while the request ran, another thread's too, so two concurrent requests could read each other's."""
    found = re.search(r'<ul class="messagelist">(.*?)</ul>', response.content.decode(), re.S)
    return [html.unescape(text) for text in re.findall(r"<li[^>]*>(.*?)</li>", found[1], re.S)] if found else []


def confirmation(page) -> str:
    """The value the "refund all" form's confirmation box sends when ticked: the amount left as the page showed it."""
    match = re.search(
        r'<input type="checkbox" name="confirm" value="([^"]*)" id="id_refund_all_confirm" required>', page.text
    )
    assert match, "no confirmation box in the refund-all form"
    return match.group(1)


def refund_from_page(client, order, captured, kind: str, **data) -> tuple[object, Refund | None]:
    """Open the order's page, fill in one refund form (ticking "refund all"'s box) and send it; the refund's task
    runs after commit."""
    page = client.get(page_url(order))
    ticked = {"confirm": confirmation(page)} if kind == "all" else {}
    form = {"kind": kind, "submission": token(page, kind), "note": "", **ticked, **data}
    with captured(execute=True):
        response = client.post(refund_url(order), form, follow=True)
    return response, Refund.objects.filter(payment__order=order).order_by("-id").first()


def section(page, section_id: str) -> str:
    """The html of one of the page's sections, up to the next one."""
    html = page.text
    start = html.index(f'id="{section_id}"')
    end = html.find('<div class="module" id="order-', start + 1)
    return html[start : end if end != -1 else len(html)]


# --- What the page shows ---------------------------------------------------------------


def test_the_page_of_a_refunded_order_shows_its_lines_payment_refunds_shipment_history_stock_and_dead_letters(
    support, fulfilled, sandbox, django_capture_on_commit_callbacks
):
    # Given an order refunded in two goes, a mug first and then the rest, with a dead letter of its hand-over
    mug = fulfilled.items.get(sku="MUG")
    with django_capture_on_commit_callbacks(execute=True):
        services.refund_order(order_id=fulfilled.pk, lines={str(mug.pk): 1}, note="mug arrived broken")
    with django_capture_on_commit_callbacks(execute=True):
        services.refund_order(order_id=fulfilled.pk, note="customer gave up")
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.REFUNDED
    payment = fulfilled.payments.get()
    first, rest = Refund.objects.filter(payment=payment).order_by("id")
    dead = FailedTaskFactory(task_name="orders.tasks.sync_to_fulfillment", args=[fulfilled.pk], exception="Boom: 503")

    # When support opens it
    page = support.get(page_url(fulfilled))

    # Then every part of it is there
    assert page.status_code == 200
    lines = section(page, "order-lines")
    assert re.search(r"<td>MUG</td>.*?<td>2</td><td>1</td><td>1</td>", lines, re.S), "mug: 2 ordered, 1 refunded"
    paid = section(page, "order-payment")
    assert payment.idempotency_key in paid and payment.provider_charge_id in paid
    assert reverse("admin:payments_payment_change", args=[payment.pk]) in paid
    refunds = section(page, "order-refunds")
    for refund in (first, rest):
        refund.refresh_from_db()
        assert refund.status == Refund.Status.SUCCEEDED
        assert refund.provider_refund_id in refunds
        assert reverse("admin:payments_refund_change", args=[refund.pk]) in refunds
    assert "10.00 EUR" in refunds and "15.00 EUR" in refunds
    assert "1 × MUG" in refunds and "mug arrived broken" in refunds and "customer gave up" in refunds
    shipment = section(page, "order-shipment")
    [shipped] = sandbox.get("/v1/shipments", order_id=fulfilled.pk).json()["data"]
    assert fulfilled.fulfillment_key in shipment and shipped["id"] in shipment
    history = section(page, "order-history")
    assert [
        status for status in ("confirmed", "paid", "fulfilled", "partially_refunded", "refunded") if status in history
    ] == [
        "confirmed",
        "paid",
        "fulfilled",
        "partially_refunded",
        "refunded",
    ]
    stock = section(page, "order-stock")
    assert "reserved" in stock and "-2" in stock and "-1" in stock
    letters = section(page, "order-dead-letters")
    assert reverse("admin:ops_failedtask_change", args=[dead.pk]) in letters and "Boom: 503" in letters
    # Nothing is left to refund, and the row has nothing to save.
    assert 'id="refund-all"' not in page.text and "No action applies" in page.text
    assert 'name="_save"' not in page.text


def test_the_status_is_never_a_form_field(support, fulfilled):
    page = support.get(page_url(fulfilled))
    assert 'name="status"' not in page.text
    support.post(page_url(fulfilled), {"status": "refunded", "total": "0"})
    fulfilled.refresh_from_db()
    assert (fulfilled.status, fulfilled.total) == (S.FULFILLED, Decimal("25.00"))


def test_a_paid_order_offers_the_three_refunds_with_what_is_left(support, fulfilled):
    page = support.get(page_url(fulfilled))
    for kind in ("all", "amount", "lines"):
        assert token(page, kind)
    assert "<strong>25.00 EUR</strong> of the 25.00 EUR charged is left to refund" in page.text
    mug = fulfilled.items.get(sku="MUG")
    assert f'name="line_{mug.pk}"' in page.text and f'max="{mug.quantity}"' in page.text
    assert 'name="csrfmiddlewaretoken"' in section(page, "order-actions")


def test_the_dead_letters_of_the_order_its_payment_refunds_and_emails_appear_and_no_others(support, fulfilled):
    refund = RefundFactory(payment=fulfilled.payments.get(), amount="5.00")
    email = Notification.objects.get(kind="order_paid", object_type="order", object_id=fulfilled.pk)
    mine = [
        FailedTaskFactory(task_name="orders.tasks.sync_to_fulfillment", args=[fulfilled.pk]),
        FailedTaskFactory(task_name="payments.needs_attention", args=[fulfilled.payments.get().pk]),
        FailedTaskFactory(task_name=REFUND_FAILED, args=[refund.pk], exception="RefundFailed: refused"),
        FailedTaskFactory(task_name="notifications.tasks.send_notification", args=[email.pk]),
    ]
    others = [
        FailedTaskFactory(task_name="orders.tasks.sync_to_fulfillment", args=[fulfilled.pk + 1]),
        FailedTaskFactory(task_name=REFUND_FAILED, args=[refund.pk + 1]),
        FailedTaskFactory(task_name="reports.tasks.generate_report", args=[fulfilled.pk]),
    ]

    letters = section(support.get(page_url(fulfilled)), "order-dead-letters")

    for letter in mine:
        assert reverse("admin:ops_failedtask_change", args=[letter.pk]) in letters
    for letter in others:
        assert reverse("admin:ops_failedtask_change", args=[letter.pk]) not in letters
    assert f"refund {refund.pk}" in letters and "email order_paid" in letters
    listed = re.search(r'href="([^"]*\?id__in=[^"]*)"', letters).group(1).replace("&amp;", "&")
    response = support.get(listed)
    # The list (where requeue and resolve are) needs ops permissions this agent lacks; a superuser sees them all.
    assert response.status_code == 403
    boss = UserFactory(is_staff=True, is_superuser=True)
    support.force_login(boss)
    shown = support.get(listed).context["cl"].result_list
    assert sorted(row.pk for row in shown) == sorted(letter.pk for letter in mine)


# --- Refunding from the page -----------------------------------------------------------


def test_staff_refund_an_amount_and_the_sandbox_gives_it_back(
    support, fulfilled, sandbox, django_capture_on_commit_callbacks
):
    response, refund = refund_from_page(
        support, fulfilled, django_capture_on_commit_callbacks, "amount", amount=" 7.50 ", note="late delivery"
    )

    assert response.redirect_chain[-1][0] == page_url(fulfilled)
    refund.refresh_from_db()
    assert (refund.amount, refund.status, refund.note) == (Decimal("7.50"), Refund.Status.SUCCEEDED, "late delivery")
    assert refund.requested_by.username == "support-ann"
    charge = fulfilled.payments.get().provider_charge_id
    assert sandbox.get(f"/v1/charges/{charge}").json()["amount_refunded"] == "7.50"
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.PARTIALLY_REFUNDED
    assert any(f"Refund #{refund.pk} of 7.50 EUR requested" in note for note in messages_of(response))
    assert "17.50 EUR</strong> of the 25.00 EUR charged is left" in response.text


def test_staff_refund_lines_at_their_price(support, fulfilled, sandbox, django_capture_on_commit_callbacks):
    mug, tee = fulfilled.items.get(sku="MUG"), fulfilled.items.get(sku="TEE")

    _, refund = refund_from_page(
        support,
        fulfilled,
        django_capture_on_commit_callbacks,
        "lines",
        **{f"line_{mug.pk}": "2", f"line_{tee.pk}": "0"},
    )

    refund.refresh_from_db()
    mug.refresh_from_db()
    tee.refresh_from_db()
    assert (refund.amount, refund.status, refund.lines) == (Decimal("20.00"), Refund.Status.SUCCEEDED, {str(mug.pk): 2})
    assert (mug.refunded_quantity, tee.refunded_quantity) == (2, 0)
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.PARTIALLY_REFUNDED


def test_staff_refund_everything_that_is_left(support, fulfilled, sandbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.refund_order(order_id=fulfilled.pk, amount="5.00")

    response, refund = refund_from_page(support, fulfilled, django_capture_on_commit_callbacks, "all")

    refund.refresh_from_db()
    fulfilled.refresh_from_db()
    assert (refund.amount, refund.status, fulfilled.status) == (Decimal("20.00"), Refund.Status.SUCCEEDED, S.REFUNDED)
    charge = fulfilled.payments.get().provider_charge_id
    assert sandbox.get(f"/v1/charges/{charge}").json()["amount_refunded"] == "25.00"
    assert "No action applies" in response.text


def test_refunding_everything_before_the_hand_over_cancels_and_puts_the_stock_back(
    support, paid, django_capture_on_commit_callbacks
):
    response, refund = refund_from_page(support, paid, django_capture_on_commit_callbacks, "all", note="out of reach")

    paid.refresh_from_db()
    assert (refund.amount, paid.status) == (Decimal("25.00"), S.REFUNDED)
    assert sorted(Product.objects.values_list("sku", "stock")) == [("MUG", 10), ("TEE", 10)]
    assert any("cancelled and its stock put back" in note for note in messages_of(response))


def test_the_same_refund_form_posted_twice_refunds_once(support, fulfilled, django_capture_on_commit_callbacks):
    form = {
        "kind": "amount",
        "amount": "4.00",
        "note": "",
        "submission": token(support.get(page_url(fulfilled)), "amount"),
    }

    with django_capture_on_commit_callbacks(execute=True):
        support.post(refund_url(fulfilled), form)
    with django_capture_on_commit_callbacks(execute=True):
        again = support.post(refund_url(fulfilled), form, follow=True)

    assert list(Refund.objects.values_list("amount", flat=True)) == [Decimal("4.00")]
    assert any("already sent" in note for note in messages_of(again))
    # A new form is a new refund.
    fresh = {**form, "submission": token(support.get(page_url(fulfilled)), "amount")}
    with django_capture_on_commit_callbacks(execute=True):
        support.post(refund_url(fulfilled), fresh)
    assert Refund.objects.count() == 2


@pytest.mark.parametrize(
    ("kind", "data", "said"),
    [
        ("amount", {"amount": "-1"}, "must be positive"),
        ("amount", {"amount": "1.001"}, "at most two decimals"),
        ("amount", {"amount": "ten"}, "not an amount"),
        ("amount", {"amount": "NaN"}, "must be positive"),
        ("amount", {"amount": "25.01"}, "more than the 25.00 EUR left"),
        ("amount", {"amount": ""}, "enter the amount"),
        ("lines", {"line_MUG": "3"}, "more than the 2 not refunded"),
        ("lines", {"line_MUG": "-1"}, "positive whole number"),
        ("lines", {"line_MUG": "1.5"}, "positive whole number"),
        ("lines", {"line_MUG": "one"}, "positive whole number"),
        ("lines", {"line_OTHER": "1"}, "has no line"),
        ("lines", {"line_999999999": "1"}, "has no line"),
        ("lines", {}, "enter how many units"),
        ("lines", {"line_MUG": "0"}, "enter how many units"),
        ("everything", {}, "kind"),
    ],
)
def test_hostile_refund_input_shows_the_error_and_claims_nothing(
    support, fulfilled, django_capture_on_commit_callbacks, kind, data, said
):
    other = OrderItemFactory(order=OrderFactory(item=None), product=ProductFactory(sku="OTHER"))
    mug = fulfilled.items.get(sku="MUG")
    named = {"MUG": mug.pk, "OTHER": other.pk}
    data = {
        re.sub(r"line_(MUG|OTHER)$", lambda m: f"line_{named[m.group(1)]}", key): value for key, value in data.items()
    }
    form = {"kind": kind, "note": "", "submission": token(support.get(page_url(fulfilled)), "amount"), **data}

    with django_capture_on_commit_callbacks(execute=True):
        response = support.post(refund_url(fulfilled), form, follow=True)

    assert response.status_code == 200
    [message] = messages_of(response)
    assert said.lower() in message.lower() and "Nothing was refunded" in message
    assert not Refund.objects.exists()
    assert not OutboxItem.objects.filter(task_name="payments.tasks.refund_payment").exists()
    assert list(OrderItem.objects.filter(refunded_quantity__gt=0)) == []


def test_refund_all_asks_to_confirm_the_amount_the_page_shows(support, fulfilled):
    page = support.get(page_url(fulfilled))
    assert confirmation(page) == "25.00"
    assert "Yes, refund 25.00 EUR" in section(page, "order-actions")


@pytest.mark.parametrize("ticked", [None, "", "yes", "on", "abc", "25.001", "-25.00", "NaN", "sNaN", "2" * 60])
def test_refund_all_without_the_box_ticked_for_the_amount_left_refunds_nothing(
    support, fulfilled, django_capture_on_commit_callbacks, ticked
):
    form = {"kind": "all", "note": "", "submission": token(support.get(page_url(fulfilled)), "all")}
    if ticked is not None:
        form["confirm"] = ticked

    with django_capture_on_commit_callbacks(execute=True):
        response = support.post(refund_url(fulfilled), form, follow=True)

    assert response.status_code == 200
    [message] = messages_of(response)
    assert "Nothing was refunded" in message and "tick" in message, message
    assert not Refund.objects.exists()
    assert not OutboxItem.objects.filter(task_name="payments.tasks.refund_payment").exists()


@pytest.mark.parametrize("ticked", ["25.00", "25", "25.0"])
def test_refund_all_ticked_for_the_amount_left_refunds_it(
    support, fulfilled, django_capture_on_commit_callbacks, ticked
):
    form = {"kind": "all", "note": "", "confirm": ticked, "submission": token(support.get(page_url(fulfilled)), "all")}
    with django_capture_on_commit_callbacks(execute=True):
        support.post(refund_url(fulfilled), form)
    assert list(Refund.objects.values_list("amount", flat=True)) == [Decimal("25.00")]


def test_refund_all_from_a_page_shown_before_another_refund_refunds_nothing_and_says_what_is_left(
    support, fulfilled, django_capture_on_commit_callbacks
):
    """A stale page: its "all" was 25.00; a colleague refunded 5.00 since. Staff confirmed 25.00, not 20.00."""
    page = support.get(page_url(fulfilled))
    with django_capture_on_commit_callbacks(execute=True):
        services.refund_order(order_id=fulfilled.pk, amount="5.00")
    form = {"kind": "all", "note": "", "confirm": confirmation(page), "submission": token(page, "all")}

    with django_capture_on_commit_callbacks(execute=True):
        response = support.post(refund_url(fulfilled), form, follow=True)

    [message] = messages_of(response)
    assert "Nothing was refunded" in message and "20.00 EUR" in message and "25.00" in message, message
    assert list(Refund.objects.values_list("amount", flat=True)) == [Decimal("5.00")]
    assert confirmation(response) == "20.00"  # the page shown again asks for what is left now


def test_refund_all_when_another_refund_commits_between_the_check_and_the_claim_refunds_nothing(
    support, fulfilled, django_capture_on_commit_callbacks, monkeypatch
):
    """Check then act: the page's 25.00 is still what is left when the admin checks, and a colleague's 5.00 commits
    before the service takes the locks. The service is given the amount confirmed, so it refuses what is now too
    much instead of refunding the 20.00 left that nobody confirmed."""
    from orders import admin as order_admin

    checked = order_admin.unconfirmed_refund_all

    def checked_then_a_colleague_refunds(order, ticked):
        refused = checked(order, ticked)
        services.refund_order(order_id=order.pk, amount="5.00")
        return refused

    monkeypatch.setattr(order_admin, "unconfirmed_refund_all", checked_then_a_colleague_refunds)
    page = support.get(page_url(fulfilled))
    form = {"kind": "all", "note": "", "confirm": confirmation(page), "submission": token(page, "all")}

    with django_capture_on_commit_callbacks(execute=True):
        response = support.post(refund_url(fulfilled), form, follow=True)

    [message] = messages_of(response)
    assert "Nothing was refunded" in message and "20.00" in message, message
    assert list(Refund.objects.values_list("amount", flat=True)) == [Decimal("5.00")]


@pytest.mark.django_db(transaction=True)
def test_two_staff_sending_refund_all_at_once_refund_it_once(fulfilled, django_capture_on_commit_callbacks):
    """Two colleagues, each with the page showing 25.00 left, send "refund all" together (their own forms): the
    payment's lock lets one refund 25.00; the other is refused, never a second refund."""
    colleagues = [
        staff_client(Client(), "orders", "view_order", "change_order", username=f"support-{name}")
        for name in ("ann", "bob")
    ]
    forms = []
    for colleague in colleagues:
        page = colleague.get(page_url(fulfilled))
        forms.append({"kind": "all", "note": "", "confirm": confirmation(page), "submission": token(page, "all")})

    responses = run_concurrently(2, lambda i: colleagues[i].post(refund_url(fulfilled), forms[i], follow=True))

    assert list(Refund.objects.values_list("amount", flat=True)) == [Decimal("25.00")]
    said = sorted("requested" in message for response in responses for message in messages_of(response))
    assert said == [False, True], [messages_of(response) for response in responses]


def test_refund_all_posted_twice_refunds_once_and_says_it_was_sent(
    support, fulfilled, django_capture_on_commit_callbacks
):
    page = support.get(page_url(fulfilled))
    form = {"kind": "all", "note": "", "confirm": confirmation(page), "submission": token(page, "all")}
    with django_capture_on_commit_callbacks(execute=True):
        support.post(refund_url(fulfilled), form)
    with django_capture_on_commit_callbacks(execute=True):
        again = support.post(refund_url(fulfilled), form, follow=True)

    assert list(Refund.objects.values_list("amount", flat=True)) == [Decimal("25.00")]
    assert any("already sent" in note for note in messages_of(again)), messages_of(again)


def test_a_refund_form_without_its_one_time_token_is_refused(support, fulfilled):
    response = support.post(refund_url(fulfilled), {"kind": "all", "note": ""}, follow=True)
    assert not Refund.objects.exists()
    assert any("submission" in note for note in messages_of(response))


def test_an_order_not_paid_offers_no_refund_and_refuses_one(support, user, products):
    order = place_order(owner=user, items=[("MUG", 1)])
    page = support.get(page_url(order))
    assert 'id="refund-all"' not in page.text

    response = support.post(refund_url(order), {"kind": "all", "note": "", "submission": "a" * 32}, follow=True)

    assert any("has no payment to refund" in note for note in messages_of(response))
    assert not Refund.objects.exists()


def test_the_refund_action_takes_only_posts(support, fulfilled):
    assert support.get(refund_url(fulfilled)).status_code == 405


# --- Who may look and act ----------------------------------------------------------------


def test_a_shopper_can_neither_see_the_page_nor_refund(client, fulfilled, user):
    client.force_login(user)  # the order's own shopper, not staff

    page = client.get(page_url(fulfilled))
    response = client.post(refund_url(fulfilled), {"kind": "all", "note": "", "submission": "b" * 32})

    assert page.status_code == 302 and page.url.startswith(reverse("admin:login"))
    assert response.status_code == 302 and response.url.startswith(reverse("admin:login"))
    assert not Refund.objects.exists()


def test_staff_who_may_only_view_orders_see_the_page_without_actions_and_cannot_refund(client, fulfilled):
    viewer = support_client(client, "view_order")

    page = viewer.get(page_url(fulfilled))
    response = viewer.post(refund_url(fulfilled), {"kind": "all", "note": "", "submission": "c" * 32})

    assert page.status_code == 200 and fulfilled.payments.get().idempotency_key in page.text
    assert 'id="refund-all"' not in page.text
    assert response.status_code == 403
    assert not Refund.objects.exists()


def test_the_refund_action_needs_the_csrf_token(fulfilled):
    guarded = Client(enforce_csrf_checks=True)
    support_client(guarded, "view_order", "change_order")
    response = guarded.post(refund_url(fulfilled), {"kind": "all", "note": "", "submission": "d" * 32})
    assert response.status_code == 403
    assert not Refund.objects.exists()


# --- Holds ----------------------------------------------------------------------------------


def held_from(origin: str) -> Order:
    order = OrderFactory(status=S.ON_HOLD, hold_reason="We could not process your order yet.")
    OrderEventFactory(order=order, from_status=origin, to_status=S.ON_HOLD, note="process_order failed: boom")
    return order


def test_an_order_held_before_payment_offers_retry_and_retrying_sends_it_back(support):
    order = held_from(S.PENDING)

    page = support.get(page_url(order))
    assert reverse("admin:orders_order_retry_hold", args=[order.pk]) in page.text
    assert reverse("admin:orders_order_fail_hold", args=[order.pk]) not in page.text  # no charge to fail
    response = support.post(reverse("admin:orders_order_retry_hold", args=[order.pk]), follow=True)

    order.refresh_from_db()
    assert order.status == S.PENDING
    assert f"Retried: order {order.pk} is now pending." in messages_of(response)
    assert order.events.last().note == "retried by staff"


def test_a_hold_action_on_an_order_no_longer_held_says_so(support, fulfilled):
    response = support.post(reverse("admin:orders_order_fail_hold", args=[fulfilled.pk]), follow=True)
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.FULFILLED
    assert any(
        "the provider took the payment, so the order is fulfilled, not failed" in note for note in messages_of(response)
    )


def test_the_list_actions_on_held_orders_still_work(support):
    order = held_from(S.PENDING)
    response = support.post(
        reverse("admin:orders_order_changelist"),
        {"action": "retry_held", "_selected_action": [order.pk], "index": 0},
        follow=True,
    )
    order.refresh_from_db()
    assert order.status == S.PENDING
    assert "1 order(s) sent back to the step they were held at." in messages_of(response)


# --- The refunds list ---------------------------------------------------------------------


def test_the_refund_list_filters_by_status_and_reason_and_finds_an_order(client):
    boss = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(boss)
    # Keys without digits: a search for the order's id must not also find the other refund by a key.
    failed = RefundFactory(
        status=Refund.Status.FAILED, reason=Refund.Reason.STAFF, provider_refund_id="re_abc", idempotency_key="ref_x"
    )
    RefundFactory(
        status=Refund.Status.SUCCEEDED,
        reason=Refund.Reason.CANCELLED_BY_SHOPPER,
        idempotency_key="ref_y",
        payment__idempotency_key="pay_y",
    )
    changelist = reverse("admin:payments_refund_changelist")

    by_status = client.get(changelist, {"status__exact": "failed", "reason__exact": "staff"})
    by_order = client.get(changelist, {"q": str(failed.payment.order_id)})
    by_provider_id = client.get(changelist, {"q": "re_abc"})
    by_word = client.get(changelist, {"q": "not-a-number"})

    for response in (by_status, by_order, by_provider_id):
        assert [row.pk for row in response.context["cl"].result_list] == [failed.pk]
    assert by_word.status_code == 200 and list(by_word.context["cl"].result_list) == []
    assert reverse("admin:orders_order_change", args=[failed.payment.order_id]) in by_status.text


def test_a_refund_cannot_be_added_changed_or_deleted_in_the_admin(client):
    boss = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(boss)
    refund = RefundFactory(amount="5.00")

    client.post(reverse("admin:payments_refund_change", args=[refund.pk]), {"amount": "20.00", "status": "failed"})

    refund.refresh_from_db()
    assert (refund.amount, refund.status) == (Decimal("5.00"), Refund.Status.REQUESTED)
    assert client.get(reverse("admin:payments_refund_add")).status_code == 403
    assert client.post(reverse("admin:payments_refund_delete", args=[refund.pk]), {"post": "yes"}).status_code == 403
