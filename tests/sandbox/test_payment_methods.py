"""The sandbox's card tokenisation and its test cards: the shop sends a token, never a card number, with a charge."""

import pytest

CARD = {"number": "4242 4242 4242 4242", "exp_month": 12, "exp_year": 2040, "cvc": "123"}


def tokenise(sandbox, **card):
    return sandbox.post("/v1/payment_methods", {"card": {**CARD, **card}})


def token(sandbox, number: str) -> str:
    response = tokenise(sandbox, number=number)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_card_is_tokenised_and_only_its_brand_last_four_and_expiry_come_back(sandbox):
    response = tokenise(sandbox)

    assert response.status_code == 201, response.text
    method = response.json()
    assert method["id"].startswith("pm_") and len(method["id"]) == 27
    assert method["card"] == {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2040}
    assert "4242424242424242" not in response.text and "123" not in response.text.replace(method["id"], "")
    assert sandbox.get(f"/v1/payment_methods/{method['id']}").json() == method
    assert sandbox.get("/v1/payment_methods/pm_000000000000000000000000").status_code == 404
    assert tokenise(sandbox, number="5555555555554444").json()["card"]["brand"] == "mastercard"


def test_a_charge_with_the_succeeding_test_card_succeeds_and_names_its_payment_method(sandbox):
    method = token(sandbox, "4242424242424242")

    response = sandbox.charge(key="pay-1", reference="pay-1", payment_method=method)

    assert response.status_code == 201, response.text
    assert (response.json()["status"], response.json()["payment_method"]) == ("succeeded", method)


@pytest.mark.parametrize(
    ("number", "decline_code"), [("4000000000000002", "card_declined"), ("4000000000009995", "insufficient_funds")]
)
def test_the_declining_test_cards_are_declined_with_their_reason(sandbox, webhook_receiver, number, decline_code):
    method = token(sandbox, number)

    response = sandbox.charge(key="pay-2", reference="pay-2", payment_method=method)

    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert (error["code"], error["decline_code"]) == ("card_declined", decline_code)
    assert error["charge"]["failure_code"] == decline_code
    assert sandbox.summary()["charges"]["by_reference"]["pay-2"] == {"succeeded": 0, "declined": 1, "total": 1}
    [hook] = webhook_receiver.wait_for(lambda event: event["type"] == "charge.declined")
    assert hook.event["data"]["charge"]["failure_code"] == decline_code


def test_the_retry_test_card_fails_its_first_attempt_retryably_and_the_retry_with_the_key_succeeds(sandbox):
    method = token(sandbox, "4000000000000119")

    first = sandbox.charge(key="pay-3", reference="pay-3", payment_method=method)
    assert first.status_code == 503, first.text
    assert first.json()["error"]["code"] == "processing_error"
    assert first.headers["Retry-After"] == "1"
    assert sandbox.summary()["charges"]["total"] == 0  # nothing charged, the key left free

    again = sandbox.charge(key="pay-3", reference="pay-3", payment_method=method)
    assert again.status_code == 201, again.text
    assert sandbox.summary()["charges"]["total"] == 1


def test_an_unknown_payment_method_is_refused_and_leaves_the_key_free(sandbox):
    response = sandbox.charge(key="pay-4", reference="pay-4", payment_method="pm_" + "0" * 24)
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (
        "resource_missing",
        "payment_method",
    )

    method = token(sandbox, "4242424242424242")
    assert sandbox.charge(key="pay-4", reference="pay-4", payment_method=method).status_code == 201


def test_one_key_with_another_payment_method_is_an_idempotency_error(sandbox):
    first, second = token(sandbox, "4242424242424242"), token(sandbox, "5555555555554444")
    assert sandbox.charge(key="pay-5", reference="pay-5", payment_method=first).status_code == 201

    response = sandbox.charge(key="pay-5", reference="pay-5", payment_method=second)

    assert response.status_code == 422
    assert sandbox.summary()["charges"]["total"] == 1


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({}, "card", "missing_field"),
        ({"card": "4242424242424242"}, "card", "invalid_type"),
        ({"card": {**CARD, "number": "4242 4242 4242 4241"}}, "card.number", "invalid_number"),  # Luhn
        ({"card": {**CARD, "number": "4242-abcd-4242-4242"}}, "card.number", "invalid_number"),
        ({"card": {**CARD, "number": "42424242"}}, "card.number", "invalid_number"),
        ({"card": {**CARD, "number": "4" * 20}}, "card.number", "invalid_number"),
        (
            {"card": {**CARD, "number": "４２４２４２４２４２４２４２４２"}},
            "card.number",
            "invalid_number",
        ),  # fullwidth
        ({"card": {**CARD, "number": 4242424242424242}}, "card.number", "invalid_type"),
        ({"card": {**CARD, "exp_month": 13}}, "card.exp_month", "invalid_expiry"),
        ({"card": {**CARD, "exp_month": "12"}}, "card.exp_month", "invalid_expiry"),
        ({"card": {**CARD, "exp_month": True}}, "card.exp_month", "invalid_expiry"),
        ({"card": {**CARD, "exp_year": 2020}}, "card.exp_year", "expired_card"),
        ({"card": {**CARD, "exp_year": 99999}}, "card.exp_year", "invalid_expiry"),
        ({"card": {**CARD, "cvc": "12"}}, "card.cvc", "invalid_cvc"),
        ({"card": {**CARD, "cvc": 123}}, "card.cvc", "invalid_cvc"),
        ({"card": {**CARD, "pin": "0000"}}, "card.pin", "unknown_field"),
        ({"card": CARD, "customer": "cus_1"}, "customer", "unknown_field"),
    ],
)
def test_hostile_cards_get_a_400_naming_the_field_and_nothing_is_stored(sandbox, body, field, code):
    response = sandbox.post("/v1/payment_methods", body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code)
    assert sandbox.summary()["payment_methods"]["total"] == 0


@pytest.mark.parametrize("payment_method", [42, "", "pm_short", "ch_" + "0" * 24, "pm_" + "G" * 24, ["pm_x"]])
def test_a_charge_with_a_malformed_payment_method_is_refused(sandbox, payment_method):
    response = sandbox.charge(key="pay-6", reference="pay-6", payment_method=payment_method)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "payment_method"
    assert sandbox.summary()["charges"]["total"] == 0


def test_a_body_that_is_not_json_is_refused(sandbox):
    response = sandbox.post("/v1/payment_methods", data=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
