"""Payment reconciliation against the real sandbox process: mismatches injected on either side, reported once."""

from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from integrations import provider
from integrations.errors import ProviderUnavailable
from orders.models import Order
from payments import refunds, services, tasks
from payments.models import Payment, PaymentMismatch, Refund
from payments.reconciliation import in_flight_grace, reconcile_payments
from tests.factories import OrderFactory, PaymentFactory, UserFactory
from tests.metrics import samples

pytestmark = pytest.mark.django_db

Kind = PaymentMismatch.Kind
CHANGELIST = reverse("admin:payments_paymentmismatch_changelist")


def paid_payment(total: str = "20.00") -> Payment:
    """An order charged the way the shop charges: claimed, charged at the sandbox, recorded."""
    order = OrderFactory(total=Decimal(total))
    with transaction.atomic():
        payment = services.claim_order_payment(order=Order.objects.select_for_update().get(pk=order.pk))
    return services.settle_payment(payment_id=payment.pk)


def provider_charge(*, amount: str, reference: str | None = None, currency: str = "EUR") -> provider.Charge:
    """A charge made straight at the sandbox, as another system (or a bug) would."""
    reference = reference or services.new_idempotency_key()
    return provider.charge(amount=Decimal(amount), currency=currency, reference=reference, idempotency_key=reference)


def reported() -> set[tuple[str, str, str]]:
    return set(PaymentMismatch.objects.values_list("kind", "reference", "provider_charge_id"))


def age(payment: Payment, by: timedelta) -> None:
    Payment.objects.filter(pk=payment.pk).update(created_at=payment.created_at - by, updated_at=payment.updated_at - by)


def test_a_clean_ledger_reports_nothing(sandbox):
    # Given: two paid orders, a declined one and one whose charge is in flight (claimed, not sent yet).
    paid = [paid_payment("20.00"), paid_payment("7.50")]
    sandbox.set_faults(decline_rate=1)
    declined = paid_payment("12.00")
    with transaction.atomic():
        services.claim_order_payment(order=Order.objects.select_for_update().get(pk=OrderFactory().pk))
    assert [payment.status for payment in (*paid, declined)] == ["succeeded", "succeeded", "declined"]

    # When
    result = reconcile_payments()

    # Then
    assert (result.payments_checked, result.charges_checked) == (4, 3)
    assert (result.found, result.new) == ([], [])
    assert not PaymentMismatch.objects.exists()


def test_injected_mismatches_are_each_reported_once(sandbox):
    # Given: a clean payment, and one mismatch of each kind the shop loses money on.
    paid_payment()
    stray = provider_charge(amount="7.00")
    uncharged = PaymentFactory(provider_charge_id="ch_never_made")
    short = provider_charge(amount="3.00")
    underpaid = PaymentFactory(
        order__total=Decimal("40.00"), idempotency_key=short.reference, provider_charge_id=short.id
    )

    # When
    first = reconcile_payments()
    second = reconcile_payments()

    # Then
    expected = {
        (Kind.PROVIDER_CHARGE_WITHOUT_PAYMENT, stray.reference, stray.id),
        (Kind.PAYMENT_WITHOUT_PROVIDER_CHARGE, uncharged.idempotency_key, "ch_never_made"),
        (Kind.AMOUNT_MISMATCH, underpaid.idempotency_key, short.id),
    }
    assert {(m.kind, m.reference, m.provider_charge_id) for m in first.new} == expected
    assert reported() == expected
    assert second.new == []
    assert {mismatch.pk for mismatch in second.found} == {mismatch.pk for mismatch in first.new}
    amount = PaymentMismatch.objects.get(kind=Kind.AMOUNT_MISMATCH)
    assert (amount.payment, amount.details, amount.resolved) == (underpaid, "shop 40.00 EUR, provider 3.00 EUR", False)
    assert PaymentMismatch.objects.get(kind=Kind.PROVIDER_CHARGE_WITHOUT_PAYMENT).payment is None


def test_a_charge_in_another_currency_is_a_currency_mismatch(sandbox):
    charge = provider_charge(amount="20.00", currency="USD")
    payment = PaymentFactory(idempotency_key=charge.reference, provider_charge_id=charge.id)

    result = reconcile_payments()

    assert [(m.kind, m.payment) for m in result.new] == [(Kind.CURRENCY_MISMATCH, payment)]


def test_money_taken_for_a_payment_the_shop_does_not_count_as_paid_is_a_status_mismatch(sandbox):
    # Given: succeeded charges for a voided payment, a declined one, and processing ones old and young.
    payments = {}
    for name, status in [
        ("voided", Payment.Status.VOIDED),
        ("declined", Payment.Status.DECLINED),
        ("stuck", Payment.Status.PROCESSING),
        ("in_flight", Payment.Status.PROCESSING),
    ]:
        charge = provider_charge(amount="20.00")
        payments[name] = PaymentFactory(status=status, idempotency_key=charge.reference)
    age(payments["stuck"], in_flight_grace() + timedelta(minutes=1))

    # When
    result = reconcile_payments()

    # Then: the one in flight is left to its charge task.
    assert {(m.kind, m.payment) for m in result.new} == {
        (Kind.STATUS_MISMATCH, payments["voided"]),
        (Kind.STATUS_MISMATCH, payments["declined"]),
        (Kind.STATUS_MISMATCH, payments["stuck"]),
    }
    assert "shop payment voided" in PaymentMismatch.objects.get(payment=payments["voided"]).details


def test_a_payment_that_needs_attention_is_left_to_staff(sandbox):
    charge = provider_charge(amount="3.00")
    PaymentFactory(
        status=Payment.Status.NEEDS_ATTENTION, idempotency_key=charge.reference, provider_charge_id=charge.id
    )

    assert reconcile_payments().found == []


def test_a_second_charge_for_a_paid_payment_is_a_charge_without_payment(sandbox):
    payment = paid_payment()
    second = provider.charge(
        amount=payment.amount, currency="EUR", reference=payment.idempotency_key, idempotency_key="another-key"
    )

    result = reconcile_payments()

    assert [(m.kind, m.reference, m.provider_charge_id, m.payment) for m in result.new] == [
        (Kind.PROVIDER_CHARGE_WITHOUT_PAYMENT, payment.idempotency_key, second.id, payment)
    ]


def test_a_declined_charge_without_a_payment_is_no_mismatch(sandbox):
    sandbox.set_faults(decline_rate=1)
    with pytest.raises(provider.CardDeclined):
        provider_charge(amount="5.00")

    result = reconcile_payments()

    assert (result.charges_checked, result.found) == (1, [])


def test_only_payments_since_the_start_of_the_window_are_checked(sandbox):
    old = PaymentFactory(provider_charge_id="ch_never_made")
    age(old, timedelta(days=3))

    assert reconcile_payments().found == []
    [mismatch] = reconcile_payments(since=timezone.now() - timedelta(days=4)).new
    assert (mismatch.kind, mismatch.payment) == (Kind.PAYMENT_WITHOUT_PROVIDER_CHARGE, old)


def test_a_payment_settled_before_the_window_is_matched_to_its_charge_inside_it(sandbox):
    # The charge was made two hours after its payment was claimed (a retried charge).
    charge = provider_charge(amount="20.00")
    payment = PaymentFactory(idempotency_key=charge.reference, provider_charge_id=charge.id)
    age(payment, timedelta(hours=2))

    assert reconcile_payments(since=timezone.now() - timedelta(hours=1)).found == []


def test_the_command_reports_new_mismatches_and_reads_since(sandbox):
    stray = provider_charge(amount="7.00")
    first, second = StringIO(), StringIO()

    call_command("reconcile_payments", "--since", "2d", stdout=first)
    call_command("reconcile_payments", "--since", timezone.now().date().isoformat(), stdout=second)

    assert f"new provider_charge_without_payment {stray.reference}: provider charge {stray.id}" in first.getvalue()
    assert "1 mismatch(es), 1 new." in first.getvalue()
    assert "new " not in second.getvalue()
    assert "1 mismatch(es), 0 new." in second.getvalue()
    with pytest.raises(CommandError, match="--since"):
        call_command("reconcile_payments", "--since", "yesterday")


@override_settings(PAYMENT_PROVIDER_URL="http://127.0.0.1:9")
def test_the_command_fails_loudly_and_stores_nothing_when_the_provider_is_unreachable():
    PaymentFactory(provider_charge_id="ch_never_made")

    with pytest.raises(CommandError, match="could not be read"):
        call_command("reconcile_payments", stdout=StringIO())
    with pytest.raises(ProviderUnavailable):
        tasks.reconcile_payments()
    assert not PaymentMismatch.objects.exists()


def test_the_daily_task_counts_the_new_mismatches(sandbox):
    provider_charge(amount="7.00")

    assert tasks.reconcile_payments.delay().get() == 1
    assert tasks.reconcile_payments.delay().get() == 0


def test_the_provider_lists_charges_from_a_time_page_by_page(sandbox):
    charges = [provider_charge(amount=f"{number}.00") for number in range(1, 6)]

    listed = list(provider.list_charges(created_gte=timezone.now() - timedelta(minutes=1), page_size=2))

    assert listed == charges
    assert list(provider.list_charges(created_gte=timezone.now() + timedelta(minutes=1))) == []
    assert list(provider.list_charges(reference=charges[2].reference)) == [charges[2]]
    assert sandbox.get("/v1/charges", starting_after="ch_unknown").status_code == 400
    page = sandbox.get("/v1/charges", limit=3).json()
    assert (len(page["data"]), page["has_more"]) == (3, True)


@override_settings(METRICS_TOKEN="")
def test_the_gauge_counts_unresolved_mismatches_by_kind(client, sandbox):
    provider_charge(amount="7.00")
    provider_charge(amount="8.00")
    PaymentFactory(provider_charge_id="ch_never_made")
    reconcile_payments()
    PaymentMismatch.objects.filter(kind=Kind.PAYMENT_WITHOUT_PROVIDER_CHARGE).update(resolved=True)

    gauge = samples(client.get("/metrics").content.decode(), "payments_reconciliation_mismatches")

    assert gauge == {
        (("kind", "provider_charge_without_payment"),): 2,
        (("kind", "payment_without_provider_charge"),): 0,
        (("kind", "amount_mismatch"),): 0,
        (("kind", "currency_mismatch"),): 0,
        (("kind", "status_mismatch"),): 0,
        (("kind", "provider_refund_without_refund"),): 0,
        (("kind", "refund_without_provider_refund"),): 0,
    }


def test_staff_see_mismatches_read_only_and_resolve_them(client, sandbox):
    provider_charge(amount="7.00")
    [mismatch] = reconcile_payments().new
    staff = UserFactory(is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(codename__in=["view_paymentmismatch", "change_paymentmismatch"])
    )
    client.force_login(staff)

    listed = client.get(CHANGELIST)
    client.post(
        reverse("admin:payments_paymentmismatch_change", args=[mismatch.pk]), {"details": "nothing", "resolved": "on"}
    )

    mismatch.refresh_from_db()
    assert listed.status_code == 200
    assert list(listed.context["cl"].result_list) == [mismatch]
    assert (mismatch.details.startswith("provider charge"), mismatch.resolved) == (True, False)
    assert client.get(reverse("admin:payments_paymentmismatch_add")).status_code == 403

    resolved = client.post(
        CHANGELIST, {"action": "mark_resolved", "_selected_action": [mismatch.pk], "index": 0}, follow=True
    )

    mismatch.refresh_from_db()
    assert resolved.status_code == 200
    assert mismatch.resolved
    # Found again by the next run, it stays resolved and is not reported again.
    assert reconcile_payments().new == []
    assert PaymentMismatch.objects.get().resolved


# --- Refunds ----------------------------------------------------------------------------


def _refund(payment: Payment, amount: str, *, settle: bool = True) -> Refund:
    with transaction.atomic():
        refund, _ = refunds.claim_refund(payment_id=payment.pk, amount=Decimal(amount))
    return refunds.settle_refund(refund_id=refund.pk) if settle else refund


def test_refunds_the_provider_and_the_shop_agree_on_report_nothing(sandbox):
    payment = paid_payment("20.00")
    _refund(payment, "5.00")
    _refund(payment, "15.00")

    assert reconcile_payments().found == []


def test_a_refund_made_at_the_provider_alone_and_one_it_never_made_are_each_reported_once(sandbox):
    # A refund straight at the provider (another system, a support tool): the shop has no record.
    foreign = paid_payment("20.00")
    provider.refund(
        charge_id=foreign.provider_charge_id,
        amount=Decimal("4.00"),
        currency="EUR",
        reference="x",
        idempotency_key="x1",
    )
    # A refund the shop recorded as given back that the provider never made.
    phantom = paid_payment("30.00")
    made = _refund(phantom, "10.00")
    Refund.objects.filter(pk=made.pk).update(amount=Decimal("12.00"))

    reconcile_payments()
    reconcile_payments()

    assert reported() == {
        (Kind.PROVIDER_REFUND_WITHOUT_REFUND, foreign.idempotency_key, foreign.provider_charge_id),
        (Kind.REFUND_WITHOUT_PROVIDER_REFUND, phantom.idempotency_key, phantom.provider_charge_id),
    }
    assert "refunded 10.00 EUR; shop refunds add up to 12.00" in PaymentMismatch.objects.get(payment=phantom).details


def test_a_refund_in_flight_is_not_a_mismatch_until_its_grace_is_over(sandbox):
    payment = paid_payment("20.00")
    refund = _refund(payment, "8.00", settle=False)
    # Made at the provider, its answer not recorded yet (a lost response, the task about to retry).
    provider.refund(
        charge_id=payment.provider_charge_id,
        amount=refund.amount,
        currency="EUR",
        reference=refund.idempotency_key,
        idempotency_key=refund.idempotency_key,
    )
    assert reconcile_payments().found == []

    Refund.objects.filter(pk=refund.pk).update(updated_at=timezone.now() - in_flight_grace() - timedelta(minutes=1))
    assert [m.kind for m in reconcile_payments().found] == [Kind.PROVIDER_REFUND_WITHOUT_REFUND]


def test_a_refund_today_of_an_old_payment_is_checked(sandbox):
    payment = paid_payment("20.00")
    age(payment, timedelta(days=30))
    made = _refund(payment, "5.00")
    Refund.objects.filter(pk=made.pk).update(amount=Decimal("6.00"))

    assert [m.kind for m in reconcile_payments().found] == [Kind.REFUND_WITHOUT_PROVIDER_REFUND]
