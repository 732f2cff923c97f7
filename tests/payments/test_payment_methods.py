"""Cards: tokenised at the real sandbox provider, kept as a token and last four digits, charged by their test number."""

import pytest
from django.db import transaction

from integrations import provider
from orders.models import Order
from orders.services import IdempotencyKeyReused, charge_order, place_order
from payments import selectors, services
from payments.models import Payment, PaymentMethod
from tests.factories import PaymentMethodFactory, ProductFactory, UserFactory

pytestmark = pytest.mark.django_db

SUCCEEDS, DECLINES, NO_FUNDS, NEEDS_RETRY = (
    "4242424242424242",
    "4000000000000002",
    "4000000000009995",
    "4000000000000119",
)


def add_card(owner, number: str = SUCCEEDS, **card) -> PaymentMethod:
    return services.add_card(owner=owner, **{"number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123", **card})


def test_a_card_is_kept_as_the_providers_token_brand_last_four_and_expiry_only(user, sandbox):
    card = add_card(user, "4242 4242 4242 4242")

    assert card.provider_token.startswith("pm_")
    assert (card.owner, card.brand, card.last4, card.exp_month, card.exp_year) == (user, "visa", "4242", 12, 2040)
    stored = " ".join(str(value) for value in PaymentMethod.objects.values().get().values())
    assert "4242424242424242" not in stored and "123" not in stored.replace(card.provider_token, "")
    assert sandbox.get(f"/v1/payment_methods/{card.provider_token}").json()["card"]["last4"] == "4242"
    assert str(card) == "Visa ending in 4242 (12/2040)"


@pytest.mark.parametrize(
    ("card", "field"),
    [
        ({"number": "4242424242424241"}, "card_number"),
        ({"number": "not a card"}, "card_number"),
        ({"number": ""}, "card_number"),
        ({"number": "4" * 40}, "card_number"),
        ({"exp_month": 0}, "exp_month"),
        ({"exp_year": 2001}, "exp_year"),
        ({"cvc": "1"}, "cvc"),
        ({"cvc": "12345"}, "cvc"),
    ],
)
def test_a_card_the_provider_refuses_is_an_error_naming_its_field_and_nothing_is_kept(user, sandbox, card, field):
    with pytest.raises(services.CardRefused) as refused:
        add_card(user, **card)
    assert (refused.value.field, refused.value.code, refused.value.status) == (field, "invalid_card", 422)
    assert not PaymentMethod.objects.exists()


def test_tokenising_is_refused_inside_a_transaction(user, sandbox):
    from core.transactions import InsideTransaction

    with pytest.raises(InsideTransaction), transaction.atomic():
        add_card(user)


def test_an_owner_sees_only_their_own_cards_and_not_removed_ones(user, other_user, sandbox):
    mine, theirs = PaymentMethodFactory(owner=user), PaymentMethodFactory(owner=other_user)
    assert list(selectors.payment_methods_for(owner=user)) == [mine]
    with pytest.raises(services.UnknownPaymentMethod):
        selectors.payment_method_get_for(owner=user, payment_method_id=theirs.pk)
    with pytest.raises(services.UnknownPaymentMethod):
        services.remove_payment_method(owner=user, payment_method_id=theirs.pk)

    services.remove_payment_method(owner=user, payment_method_id=mine.pk)

    assert list(selectors.payment_methods_for(owner=user)) == []
    with pytest.raises(services.UnknownPaymentMethod):
        services.remove_payment_method(owner=user, payment_method_id=mine.pk)
    assert PaymentMethod.objects.filter(pk=theirs.pk, removed_at__isnull=True).exists()


def order_with(user, card: PaymentMethod, stock: int = 5) -> tuple[Order, object]:
    product = ProductFactory(sku="CARD-1", price="12.50", stock=stock)
    return place_order(owner=user, items=[("CARD-1", 2)], payment_method_id=card.pk), product


def test_an_order_placed_with_the_succeeding_card_is_charged_to_it(user, sandbox, django_capture_on_commit_callbacks):
    card = add_card(user)
    with django_capture_on_commit_callbacks(execute=True):
        order, _ = order_with(user, card)

    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED
    payment = order.payments.get()
    assert payment.payment_method == card
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    assert (charge["status"], charge["payment_method"]) == ("succeeded", card.provider_token)


@pytest.mark.parametrize(("number", "reason"), [(DECLINES, "card_declined"), (NO_FUNDS, "insufficient_funds")])
def test_an_order_paid_with_a_declining_card_fails_with_its_reason_and_gives_its_stock_back(
    user, sandbox, django_capture_on_commit_callbacks, number, reason
):
    card = add_card(user, number)
    with django_capture_on_commit_callbacks(execute=True):
        order, product = order_with(user, card)

    order.refresh_from_db()
    product.refresh_from_db()
    assert order.status == Order.Status.PAYMENT_FAILED
    assert order.payments.get().failure_reason == reason
    assert product.stock == 5
    assert sandbox.summary()["charges"]["by_status"] == {"succeeded": 0, "declined": 1}


def test_a_card_that_needs_a_retry_is_charged_once_on_the_retry(user, sandbox):
    card = add_card(user, NEEDS_RETRY)
    order, _ = order_with(user, card)  # no after-commit work: the steps are run by hand below
    from orders.services import process_order

    process_order(order_id=order.pk)

    with pytest.raises(provider.ProviderUnavailable):
        charge_order(order_id=order.pk)  # the task would retry this with backoff
    assert Payment.objects.get(order=order).status == Payment.Status.PROCESSING
    assert charge_order(order_id=order.pk).status == Order.Status.PAID
    assert sandbox.summary()["charges"]["by_status"] == {"succeeded": 1, "declined": 0}


def test_an_order_cannot_name_another_owners_card_or_a_removed_one(user, other_user, sandbox):
    ProductFactory(sku="CARD-2", stock=5)
    theirs, removed = PaymentMethodFactory(owner=other_user), PaymentMethodFactory(owner=user)
    services.remove_payment_method(owner=user, payment_method_id=removed.pk)

    for card_id in (theirs.pk, removed.pk, 10**9):
        with pytest.raises(services.UnknownPaymentMethod) as unknown:
            place_order(owner=user, items=[("CARD-2", 1)], payment_method_id=card_id)
        assert unknown.value.status == 404
    assert not Order.objects.exists()


def test_one_idempotency_key_with_another_card_is_refused(user, sandbox):
    ProductFactory(sku="CARD-3", stock=5)
    first, second = PaymentMethodFactory(owner=user), PaymentMethodFactory(owner=user)
    order = place_order(owner=user, items=[("CARD-3", 1)], idempotency_key="k-1", payment_method_id=first.pk)

    assert place_order(owner=user, items=[("CARD-3", 1)], idempotency_key="k-1", payment_method_id=first.pk) == order
    with pytest.raises(IdempotencyKeyReused):
        place_order(owner=user, items=[("CARD-3", 1)], idempotency_key="k-1", payment_method_id=second.pk)
    assert Order.objects.count() == 1


def test_a_subscription_period_is_charged_to_the_subscriptions_card(sandbox):
    from tests.factories import PlanFactory, SubscriptionFactory

    owner = UserFactory()
    card = add_card(owner, NO_FUNDS)
    subscription = SubscriptionFactory(owner=owner, plan=PlanFactory(price="9.00"), payment_method=card)

    payment = services.charge_subscription(
        subscription_id=subscription.pk, billing_period=subscription.current_period_start.isoformat()
    )

    assert (payment.status, payment.failure_reason, payment.payment_method) == ("declined", "insufficient_funds", card)
    subscription.refresh_from_db()
    assert subscription.status == "past_due"
