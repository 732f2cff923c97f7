"""`POST /v1/refunds` and its reads: idempotency, the "never more than charged" rule, faults, webhooks, bad input."""

import pytest

from tests.concurrency import run_concurrently
from tests.sandbox_fixtures import SandboxClient, SandboxProcess


def charged(sandbox: SandboxClient, *, amount: str = "100.00", key: str = "order-1", **extra) -> dict:
    response = sandbox.charge(key=key, reference=key, amount=amount, **extra)
    assert response.status_code == 201, response.text
    return response.json()


def refund(
    sandbox: SandboxClient,
    charge_id: str,
    amount: str,
    *,
    key: str,
    currency: str = "EUR",
    reference: str = "refund-1",
    timeout: float = 10,
):
    body = {"charge": charge_id, "amount": amount, "currency": currency, "reference": reference}
    return sandbox.post("/v1/refunds", body, key=key, timeout=timeout)


def refunds(sandbox: SandboxClient, **params) -> list[dict]:
    response = sandbox.get("/v1/refunds", **params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def assert_refused(response, status: int, code: str, field: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["field"]) == ("invalid_request_error", code, field)


def test_full_refund_is_recorded_and_the_charge_shows_it(sandbox):
    charge = charged(sandbox, amount="12.50")

    response = refund(sandbox, charge["id"], "12.50", key="refund-1", reference="order-1-refund")

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("re_")
    assert created == {
        "id": created["id"],
        "object": "refund",
        "status": "succeeded",
        "amount": "12.50",
        "currency": "EUR",
        "charge": charge["id"],
        "reference": "order-1-refund",
        "idempotency_key": "refund-1",
        "created": created["created"],
    }
    assert isinstance(created["created"], int)
    assert "Idempotent-Replayed" not in response.headers
    assert sandbox.get(f"/v1/refunds/{created['id']}").json() == created
    assert refunds(sandbox, charge=charge["id"]) == [created]
    after = sandbox.get(f"/v1/charges/{charge['id']}").json()
    assert (after["amount_refunded"], after["refunded"]) == ("12.50", True)
    # Nothing else about the charge changes.
    assert {k: v for k, v in after.items() if k not in ("amount_refunded", "refunded")} == {
        k: v for k, v in charge.items() if k not in ("amount_refunded", "refunded")
    }
    assert sandbox.summary()["refunds"] == {
        "total": 1,
        "by_status": {"succeeded": 1, "pending": 0, "failed": 0},
        "amount_refunded": {"EUR": "12.50"},
        "charges_refunded_more_than_charged": [],
    }


def test_a_new_charge_shows_nothing_refunded(sandbox):
    charge = charged(sandbox, amount="9.99")

    assert (charge["amount_refunded"], charge["refunded"]) == ("0.00", False)
    assert sandbox.charges(reference="order-1") == [charge]


def test_partial_refunds_add_up_and_one_past_the_rest_is_refused(sandbox):
    charge = charged(sandbox, amount="100.00")

    first = refund(sandbox, charge["id"], "30.00", key="r-1")
    second = refund(sandbox, charge["id"], "50.00", key="r-2")
    too_much = refund(sandbox, charge["id"], "20.01", key="r-3")

    assert (first.status_code, second.status_code) == (201, 201)
    assert_refused(too_much, 400, "amount_too_large", "amount")
    assert "20.00 EUR" in too_much.json()["error"]["message"]
    partly = sandbox.get(f"/v1/charges/{charge['id']}").json()
    assert (partly["amount_refunded"], partly["refunded"]) == ("80.00", False)
    # The refused key was left free: the same key for what is left succeeds.
    rest = refund(sandbox, charge["id"], "20", key="r-3")
    assert rest.status_code == 201, rest.text
    assert_refused(refund(sandbox, charge["id"], "0.01", key="r-4"), 400, "amount_too_large", "amount")
    full = sandbox.get(f"/v1/charges/{charge['id']}").json()
    assert (full["amount_refunded"], full["refunded"]) == ("100.00", True)
    assert [r["amount"] for r in refunds(sandbox, charge=charge["id"])] == ["30.00", "50.00", "20.00"]


def test_same_key_and_params_replays_the_stored_refund(sandbox):
    charge = charged(sandbox)
    first = refund(sandbox, charge["id"], "10.00", key="r-1")
    # amount_minor and a lowercase currency normalize to the same parameters.
    second = sandbox.post(
        "/v1/refunds",
        {"charge": charge["id"], "amount_minor": 1000, "currency": "eur", "reference": "refund-1"},
        key="r-1",
    )

    assert (first.status_code, second.status_code) == (201, 201)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert len(refunds(sandbox, charge=charge["id"])) == 1
    assert sandbox.get(f"/v1/charges/{charge['id']}").json()["amount_refunded"] == "10.00"


def test_same_key_with_another_amount_is_an_idempotency_error(sandbox):
    charge = charged(sandbox)
    refund(sandbox, charge["id"], "10.00", key="r-1")

    response = refund(sandbox, charge["id"], "11.00", key="r-1")

    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["type"], error["code"], error["field"]) == (
        "idempotency_error",
        "idempotency_key_reused",
        "Idempotency-Key",
    )
    assert len(refunds(sandbox)) == 1


def test_refund_keys_are_apart_from_charge_keys(sandbox):
    charge = charged(sandbox, key="order-7")

    assert refund(sandbox, charge["id"], "1.00", key="order-7").status_code == 201


def test_unknown_charge_is_404_and_records_nothing(sandbox):
    response = refund(sandbox, "ch_missing", "1.00", key="r-1")

    assert_refused(response, 404, "resource_missing", "charge")
    summary = sandbox.summary()
    assert summary["refunds"]["total"] == 0
    assert summary["idempotency_keys"]["total"] == 0


def test_a_declined_charge_is_not_refundable(sandbox):
    declined = sandbox.charge(key="order-9", reference="order-9", metadata={"force": "decline"})
    assert declined.status_code == 402
    charge_id = declined.json()["error"]["charge"]["id"]

    response = refund(sandbox, charge_id, "1.00", key="r-1")

    assert_refused(response, 400, "charge_not_refundable", "charge")
    assert refunds(sandbox) == []


def test_another_currency_than_the_charges_is_refused(sandbox):
    charge = charged(sandbox)

    response = refund(sandbox, charge["id"], "1.00", key="r-1", currency="USD")

    assert_refused(response, 400, "currency_mismatch", "currency")
    assert refunds(sandbox) == []


def test_concurrent_refunds_with_different_keys_never_exceed_the_charge(sandbox):
    charge = charged(sandbox, amount="100.00")

    statuses = run_concurrently(8, lambda i: refund(sandbox, charge["id"], "30.00", key=f"r-{i}").status_code)

    assert sorted(statuses) == [201] * 3 + [400] * 5
    summary = sandbox.summary()["refunds"]
    assert (summary["total"], summary["amount_refunded"]) == (3, {"EUR": "90.00"})
    assert summary["charges_refunded_more_than_charged"] == []
    assert sandbox.get(f"/v1/charges/{charge['id']}").json()["amount_refunded"] == "90.00"


@pytest.mark.sandbox_process  # starts its own `python -m sandbox` with two worker processes
def test_concurrent_refunds_across_worker_processes_never_exceed_the_charge(tmp_path):
    process = SandboxProcess(
        db_path=tmp_path / "sandbox.sqlite3", log_path=tmp_path / "sandbox.log", env={"SANDBOX_WORKERS": "2"}
    )
    try:
        client = SandboxClient(process.url)
        charge = charged(client, amount="100.00")

        statuses = run_concurrently(12, lambda i: refund(client, charge["id"], "30.00", key=f"r-{i}").status_code)

        assert sorted(statuses) == [201] * 3 + [400] * 9
        assert [r["amount"] for r in refunds(client, charge=charge["id"])] == ["30.00"] * 3
        assert client.summary()["refunds"]["charges_refunded_more_than_charged"] == []
    finally:
        process.stop()


def test_concurrent_requests_with_one_key_make_one_refund_and_get_409(sandbox):
    charge = charged(sandbox)
    sandbox.set_faults(latency_ms=400)

    statuses = run_concurrently(4, lambda i: refund(sandbox, charge["id"], "5.00", key="r-1").status_code)

    assert sorted(statuses) == [201] + [409] * 3
    assert len(refunds(sandbox)) == 1


def test_lost_response_retry_with_the_same_key_gets_the_recorded_refund(sandbox, webhook_receiver):
    charge = charged(sandbox)
    sandbox.set_faults(fail_after_refund_next=1)

    lost = refund(sandbox, charge["id"], "25.00", key="r-1")
    [recorded] = refunds(sandbox, charge=charge["id"])
    retry = refund(sandbox, charge["id"], "25.00", key="r-1")

    assert lost.status_code == 500
    assert lost.json()["error"]["code"] == "response_lost"
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == recorded
    assert len(refunds(sandbox)) == 1
    assert sandbox.get("/v1/faults").json()["fail_after_refund_next"] == 0
    webhook_receiver.wait_for(lambda event: event["data"].get("refund", {}).get("id") == recorded["id"])


def test_fail_after_charge_next_does_not_fire_on_refunds(sandbox):
    charge = charged(sandbox)
    sandbox.set_faults(fail_after_charge_next=1)

    assert refund(sandbox, charge["id"], "1.00", key="r-1").status_code == 201
    assert sandbox.get("/v1/faults").json()["fail_after_charge_next"] == 1


def test_front_door_faults_record_nothing_and_leave_the_key_free(sandbox):
    charge = charged(sandbox)
    sandbox.set_faults(fail_next=1)

    failed = refund(sandbox, charge["id"], "1.00", key="r-1")

    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "1"
    assert refunds(sandbox) == []
    assert refund(sandbox, charge["id"], "1.00", key="r-1").status_code == 201


def test_refund_event_is_queued_and_delivered_and_charge_events_keep_their_shape(sandbox, webhook_receiver):
    charge = charged(sandbox)
    created = refund(sandbox, charge["id"], "40.00", key="r-1").json()

    [hook] = webhook_receiver.wait_for(lambda event: event["type"] == "refund.succeeded")

    assert hook.event == {
        "id": hook.event["id"],
        "type": "refund.succeeded",
        "created": hook.event["created"],
        "data": {"refund": created},
    }
    assert hook.event["id"].startswith("evt_")
    [charge_hook] = webhook_receiver.wait_for(lambda event: event["type"] == "charge.succeeded")
    assert set(charge_hook.event) == {"id", "type", "created", "data"}
    assert charge_hook.event["data"] == {"charge": charge}
    # Both are filed under the charge.
    events = sandbox.get("/v1/events", charge_id=charge["id"]).json()["data"]
    assert [event["type"] for event in events] == ["charge.succeeded", "refund.succeeded"]
    assert events[1]["payload"] == hook.event


def test_refunds_are_listed_oldest_first_filtered_and_paged(sandbox):
    first_charge = charged(sandbox, key="order-1")
    second_charge = charged(sandbox, key="order-2")
    made = [
        refund(sandbox, first_charge["id"], "1.00", key="r-1", reference="a").json(),
        refund(sandbox, second_charge["id"], "2.00", key="r-2", reference="b").json(),
        refund(sandbox, first_charge["id"], "3.00", key="r-3", reference="a").json(),
    ]

    page = sandbox.get("/v1/refunds", limit="2").json()
    rest = sandbox.get("/v1/refunds", limit="2", starting_after=page["data"][-1]["id"]).json()

    assert (page["object"], page["has_more"], rest["has_more"]) == ("list", True, False)
    assert page["data"] + rest["data"] == made
    assert refunds(sandbox, charge=first_charge["id"]) == [made[0], made[2]]
    assert refunds(sandbox, reference="b") == [made[1]]
    assert refunds(sandbox, charge=first_charge["id"], reference="b") == []
    assert refunds(sandbox, charge="ch_missing") == []


def test_unknown_refund_and_cursor_are_refused(sandbox):
    missing = sandbox.get("/v1/refunds/re_missing")
    cursor = sandbox.get("/v1/refunds", starting_after="re_missing")

    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "not_found")
    assert_refused(cursor, 400, "resource_missing", "starting_after")
    assert sandbox.get("/v1/refunds", limit="0").status_code == 400


def test_reset_wipes_refunds(sandbox):
    charge = charged(sandbox)
    refund(sandbox, charge["id"], "1.00", key="r-1")

    assert sandbox.post("/v1/reset").status_code == 200

    assert refunds(sandbox) == []
    assert sandbox.summary()["refunds"]["total"] == 0


VALID = {"charge": "ch_placeholder", "amount": "1.00", "currency": "EUR", "reference": "refund-1"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": "-1.00"}, "amount"),
        ({"amount": "0"}, "amount"),
        ({"amount": "0.00"}, "amount"),
        ({"amount": "1.005"}, "amount"),
        ({"amount": "99999999999999.00"}, "amount"),
        ({"amount": "1" * 400}, "amount"),
        ({"amount": "1e3"}, "amount"),
        ({"amount": "NaN"}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": None}, "amount"),
        ({"amount_minor": 10**30, "amount": None}, "amount_minor"),
        ({"amount_minor": 100}, "amount"),
        ({"currency": "EURO"}, "currency"),
        ({"currency": None}, "currency"),
        ({"charge": None}, "charge"),
        ({"charge": 42}, "charge"),
        ({"charge": ""}, "charge"),
        ({"charge": "c" * 10_000}, "charge"),
        ({"reference": None}, "reference"),
        ({"reference": "x" * 10_000}, "reference"),
        ({"reference": ["a"]}, "reference"),
        ({"metadata": {}}, "metadata"),
    ],
)
def test_bad_refund_fields_are_400_naming_the_field(sandbox, changes, field):
    charge = charged(sandbox)
    body = {**VALID, "charge": charge["id"], **changes}
    body = {name: value for name, value in body.items() if value is not None}

    response = sandbox.post("/v1/refunds", body, key="bad")

    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field
    assert sandbox.summary()["refunds"]["total"] == 0


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"", b"\xff\xfe", b'{"amount": NaN}', b"[" * 60_000])
def test_refund_bodies_that_are_not_a_json_object_are_400(sandbox, raw):
    response = sandbox.post("/v1/refunds", key="bad", data=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_refund_without_an_idempotency_key_is_400(sandbox):
    charge = charged(sandbox)

    response = sandbox.post("/v1/refunds", {**VALID, "charge": charge["id"]})

    assert_refused(response, 400, "missing_idempotency_key", "Idempotency-Key")
    assert refunds(sandbox) == []
