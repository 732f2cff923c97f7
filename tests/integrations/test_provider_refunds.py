"""The provider client's refunds: against the sandbox (in-process behind the stub, as every unit test gets it), and
its error mapping against a scripted server for the answers the sandbox does not give on demand."""

from contextlib import ExitStack
from decimal import Decimal

import pytest

from integrations.errors import ProviderRejected, ProviderUnavailable
from integrations.provider import (
    Charge,
    Refund,
    RefundRefused,
    charge,
    list_refunds,
    refund,
    retrieve_charge,
    retrieve_refund,
)
from tests.concurrency import run_concurrently
from tests.integrations.test_http_deadline import http_server, respond

REFUND_BODY = {
    "id": "re_1",
    "object": "refund",
    "status": "succeeded",
    "amount": "12.50",
    "currency": "EUR",
    "charge": "ch_1",
    "reference": "order-1",
    "idempotency_key": "refund-1",
    "created": 1,
}


def charged(amount: str = "100.00", reference: str = "order-1") -> Charge:
    return charge(amount=Decimal(amount), currency="EUR", reference=reference, idempotency_key=f"pay-{reference}")


def refund_of(made: Charge, amount: str, key: str, *, currency: str = "EUR") -> Refund:
    return refund(
        charge_id=made.id, amount=Decimal(amount), currency=currency, reference=made.reference, idempotency_key=key
    )


def test_refund_is_made_retrieved_listed_and_shown_on_the_charge(sandbox):
    made = charged()

    first = refund_of(made, "30.00", "refund-1")
    second = refund_of(made, "20.50", "refund-2")

    assert first == Refund(
        id=first.id,
        status="succeeded",
        amount=Decimal("30.00"),
        currency="EUR",
        charge_id=made.id,
        reference="order-1",
        idempotency_key="refund-1",
    )
    assert first.id.startswith("re_")
    assert retrieve_refund(refund_id=second.id) == second
    # One refund a page: the pages are followed to the end.
    assert list(list_refunds(charge_id=made.id, page_size=1)) == [first, second]
    assert list(list_refunds(reference="order-1")) == [first, second]
    assert list(list_refunds(reference="order-2")) == []
    assert retrieve_charge(charge_id=made.id).amount_refunded == Decimal("50.50")
    assert made.amount_refunded == Decimal("0.00")


def test_a_retry_with_the_same_key_is_the_same_refund(sandbox):
    made = charged()

    first = refund_of(made, "10.00", "refund-1")

    assert refund_of(made, "10.00", "refund-1") == first
    assert len(list(list_refunds(charge_id=made.id))) == 1


@pytest.mark.parametrize(
    ("charge_of", "amount", "currency", "code"),
    [
        ("nobody", "1.00", "EUR", "resource_missing"),
        ("a decline", "1.00", "EUR", "charge_not_refundable"),
        ("the order", "10.01", "EUR", "amount_too_large"),
        ("the order", "1.00", "USD", "currency_mismatch"),
        ("the order", "0.00", "EUR", "invalid_amount"),
    ],
)
def test_refusals_are_refund_refused_with_the_providers_code(sandbox, charge_of, amount, currency, code):
    declined = sandbox.charge(key="declined", reference="declined", metadata={"force": "decline"})
    charge_ids = {
        "nobody": "ch_missing",
        "a decline": declined.json()["error"]["charge"]["id"],
        "the order": charged(amount="10.00").id,
    }

    with pytest.raises(RefundRefused) as raised:
        refund(
            charge_id=charge_ids[charge_of],
            amount=Decimal(amount),
            currency=currency,
            reference="order-1",
            idempotency_key="refund-1",
        )

    assert raised.value.code == code
    assert raised.value.message
    assert isinstance(raised.value, ProviderRejected)
    assert list(list_refunds()) == []


def test_the_key_reused_for_another_amount_is_rejected_not_refused(sandbox):
    made = charged()
    refund_of(made, "10.00", "refund-1")

    with pytest.raises(ProviderRejected) as raised:
        refund_of(made, "11.00", "refund-1")

    assert not isinstance(raised.value, RefundRefused)
    assert "422" in str(raised.value)


def test_a_lost_response_is_unavailable_and_the_retry_gets_the_recorded_refund(sandbox):
    made = charged()
    sandbox.set_faults(fail_after_refund_next=1)

    with pytest.raises(ProviderUnavailable):
        refund_of(made, "25.00", "refund-1")
    [recorded] = list_refunds(charge_id=made.id)

    assert refund_of(made, "25.00", "refund-1") == recorded
    assert list(list_refunds(charge_id=made.id)) == [recorded]


def test_a_front_door_fault_is_unavailable_and_refunds_nothing(sandbox):
    made = charged()
    sandbox.set_faults(fail_next=1)

    with pytest.raises(ProviderUnavailable):
        refund_of(made, "25.00", "refund-1")

    assert list(list_refunds()) == []
    assert refund_of(made, "25.00", "refund-1").amount == Decimal("25.00")


def test_concurrent_client_refunds_never_exceed_the_charge(sandbox):
    made = charged(amount="100.00")

    def attempt(i: int) -> str:
        try:
            return refund_of(made, "30.00", f"refund-{i}").status
        except RefundRefused as refused:
            return refused.code

    outcomes = run_concurrently(8, attempt)

    assert sorted(outcomes) == ["amount_too_large"] * 5 + ["succeeded"] * 3
    assert retrieve_charge(charge_id=made.id).amount_refunded == Decimal("90.00")


@pytest.fixture
def provider_at(settings):
    """Answer every call to the provider with `status` and `body` (a scripted server, for the rest of the test)."""
    with ExitStack() as servers:

        def serve(status: int, body: dict) -> None:
            settings.PAYMENT_PROVIDER_URL = servers.enter_context(http_server(respond(status, body)))

        yield serve


def refund_once() -> Refund:
    return refund(
        charge_id="ch_1", amount=Decimal("12.50"), currency="EUR", reference="order-1", idempotency_key="refund-1"
    )


def test_a_normal_reply_is_a_refund(provider_at):
    provider_at(201, REFUND_BODY)

    assert refund_once() == Refund(
        id="re_1",
        status="succeeded",
        amount=Decimal("12.50"),
        currency="EUR",
        charge_id="ch_1",
        reference="order-1",
        idempotency_key="refund-1",
    )


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
def test_not_now_and_server_errors_are_unavailable(provider_at, status):
    provider_at(status, {"error": {"type": "api_error", "code": "x"}})

    with pytest.raises(ProviderUnavailable):
        refund_once()


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, {"code": "amount_too_large", "message": "Only 1.00 EUR is left"}, "amount_too_large"),
        (404, {"code": "resource_missing", "message": "No such charge"}, "resource_missing"),
        (400, {"type": "invalid_request_error"}, "invalid_request_error"),
    ],
)
def test_bad_request_and_not_found_are_refund_refused_with_the_code(provider_at, status, error, code):
    provider_at(status, {"error": error})

    with pytest.raises(RefundRefused) as raised:
        refund_once()

    assert raised.value.code == code


def test_a_not_found_without_a_json_body_is_still_refused(provider_at):
    provider_at(404, {})

    with pytest.raises(RefundRefused) as raised:
        refund_once()

    assert (raised.value.code, raised.value.message) == ("refund_refused", "the refund was refused")


@pytest.mark.parametrize("status", [401, 403, 422])
def test_other_client_errors_are_rejected_but_not_refused(provider_at, status):
    provider_at(status, {"error": {"type": "idempotency_error", "code": "idempotency_key_reused"}})

    with pytest.raises(ProviderRejected) as raised:
        refund_once()

    assert not isinstance(raised.value, RefundRefused)


@pytest.mark.parametrize(("status", "error"), [(500, ProviderUnavailable), (404, ProviderRejected)])
def test_retrieve_refund_maps_server_errors_to_unavailable_and_client_errors_to_rejected(provider_at, status, error):
    provider_at(status, {"error": {"type": "x"}})

    with pytest.raises(error):
        retrieve_refund(refund_id="re_1")


def test_an_unknown_refund_is_rejected_by_the_sandbox(sandbox):
    with pytest.raises(ProviderRejected):
        retrieve_refund(refund_id="re_missing")


@pytest.mark.parametrize(("status", "error"), [(503, ProviderUnavailable), (400, ProviderRejected)])
def test_list_refunds_maps_errors_like_retrieve(provider_at, status, error):
    provider_at(status, {"error": {"type": "x"}})

    with pytest.raises(error):
        list(list_refunds(charge_id="ch_1"))


def test_a_charge_without_amount_refunded_has_none_refunded(provider_at):
    provider_at(200, {"id": "ch_1", "status": "succeeded", "amount": "5.00", "currency": "EUR", "reference": "o"})

    assert retrieve_charge(charge_id="ch_1").amount_refunded == Decimal("0")
