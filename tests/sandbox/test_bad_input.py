import json

import pytest

VALID_CHARGE = {"amount": "12.50", "currency": "EUR", "reference": "order-1"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**VALID_CHARGE, "amount": 12.5}, "amount"),
        ({**VALID_CHARGE, "amount": "-1.00"}, "amount"),
        ({**VALID_CHARGE, "amount": "0.00"}, "amount"),
        ({**VALID_CHARGE, "amount": "12.505"}, "amount"),
        ({**VALID_CHARGE, "amount": "NaN"}, "amount"),
        ({**VALID_CHARGE, "amount": "1e3"}, "amount"),
        ({"amount_minor": -5, "currency": "EUR", "reference": "r"}, "amount_minor"),
        ({"amount_minor": "1250", "currency": "EUR", "reference": "r"}, "amount_minor"),
        ({"amount_minor": True, "currency": "EUR", "reference": "r"}, "amount_minor"),
        ({"amount_minor": 10**30, "currency": "EUR", "reference": "r"}, "amount_minor"),
        ({**VALID_CHARGE, "amount_minor": 1250}, "amount"),
        ({"currency": "EUR", "reference": "r"}, "amount"),
        ({"amount": "1.00", "reference": "r"}, "currency"),
        ({**VALID_CHARGE, "currency": "EURO"}, "currency"),
        ({**VALID_CHARGE, "currency": 978}, "currency"),
        ({"amount": "1.00", "currency": "EUR"}, "reference"),
        ({**VALID_CHARGE, "reference": ""}, "reference"),
        ({**VALID_CHARGE, "reference": "x" * 501}, "reference"),
        ({**VALID_CHARGE, "metadata": "x"}, "metadata"),
        ({**VALID_CHARGE, "metadata": {"nested": {"a": 1}}}, "metadata.nested"),
        ({**VALID_CHARGE, "customer": "c1"}, "customer"),
    ],
)
def test_bad_charge_fields_are_400_naming_the_field(sandbox, body, field):
    response = sandbox.post("/v1/charges", body, key="bad")

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["field"] == field


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe", b'{"amount": NaN}', b"[" * 60_000],
)
def test_bodies_that_are_not_a_json_object_are_400(sandbox, raw):
    response = sandbox.post("/v1/charges", key="bad", data=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_missing_or_bad_idempotency_key_is_400(sandbox):
    missing = sandbox.post("/v1/charges", VALID_CHARGE)
    too_long = sandbox.post("/v1/charges", VALID_CHARGE, key="k" * 256)

    assert missing.status_code == too_long.status_code == 400
    assert missing.json()["error"]["field"] == too_long.json()["error"]["field"] == "Idempotency-Key"


def test_oversized_body_is_413_declared_or_streamed(sandbox):
    big = json.dumps({**VALID_CHARGE, "description": "x" * 70_000}).encode()

    declared = sandbox.post("/v1/charges", key="big", data=big)
    streamed = sandbox.post("/v1/charges", key="big", data=iter([big[:40_000], big[40_000:]]))

    assert declared.status_code == streamed.status_code == 413
    assert declared.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"sku": "A", "quantity": 1}]}, "order_id"),
        ({"order_id": "12", "items": [{"sku": "A", "quantity": 1}]}, "order_id"),
        ({"order_id": -1, "items": [{"sku": "A", "quantity": 1}]}, "order_id"),
        ({"order_id": 12}, "items"),
        ({"order_id": 12, "items": []}, "items"),
        ({"order_id": 12, "items": ["A"]}, "items[0]"),
        ({"order_id": 12, "items": [{"quantity": 1}]}, "items[0].sku"),
        ({"order_id": 12, "items": [{"sku": "A", "quantity": 0}]}, "items[0].quantity"),
        ({"order_id": 12, "items": [{"sku": "A", "quantity": 1.5}]}, "items[0].quantity"),
    ],
)
def test_bad_shipment_fields_are_400_naming_the_field(sandbox, body, field):
    response = sandbox.post("/v1/shipments", body, key="bad")

    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"error_rate": 2}, "error_rate"),
        ({"error_rate": "0.5"}, "error_rate"),
        ({"fail_next": -1}, "fail_next"),
        ({"fail_next": 1.5}, "fail_next"),
        ({"latency_ms": True}, "latency_ms"),
        ({"fail_after_refund_next": -1}, "fail_after_refund_next"),
        ({"fail_after_refund_next": "1"}, "fail_after_refund_next"),
        ({"chaos": 1}, "chaos"),
    ],
)
def test_bad_fault_settings_are_400_and_change_nothing(sandbox, body, field):
    before = sandbox.get("/v1/faults").json()

    response = sandbox.session.put(f"{sandbox.url}/v1/faults", json=body, timeout=10)

    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert sandbox.get("/v1/faults").json() == before


def test_bad_query_parameters_are_400(sandbox):
    assert sandbox.get("/v1/shipments", order_id="abc").json()["error"]["field"] == "order_id"
    assert sandbox.get("/v1/charges", status="refunded").json()["error"]["field"] == "status"
    assert sandbox.get("/v1/charges", limit="0").status_code == 400


def test_bad_input_records_nothing(sandbox):
    sandbox.post("/v1/charges", {**VALID_CHARGE, "amount": "-1"}, key="bad")
    sandbox.post("/v1/charges", VALID_CHARGE)

    summary = sandbox.summary()
    assert summary["charges"]["total"] == 0
    assert summary["idempotency_keys"]["total"] == 0


def test_unknown_routes_and_methods_are_json_errors(sandbox):
    missing = sandbox.get("/v1/disputes")
    wrong_method = sandbox.session.delete(f"{sandbox.url}/v1/charges", timeout=10)

    assert missing.status_code == 404
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST, GET"
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
