from sandbox.signing import parse_header, verify
from tests.concurrency import run_concurrently
from tests.sandbox_fixtures import WEBHOOK_SECRET


def test_charge_succeeds_and_is_in_the_ledger(sandbox):
    response = sandbox.charge(key="order-12", reference="order-12", metadata={"order_id": 12})

    assert response.status_code == 201, response.text
    charge = response.json()
    assert charge["id"].startswith("ch_")
    assert charge["status"] == "succeeded"
    assert (charge["amount"], charge["amount_minor"], charge["currency"]) == ("12.50", 1250, "EUR")
    assert charge["reference"] == "order-12"
    assert charge["metadata"] == {"order_id": 12}
    assert "Idempotent-Replayed" not in response.headers
    assert sandbox.get(f"/v1/charges/{charge['id']}").json() == charge
    assert sandbox.charges(reference="order-12") == [charge]


def test_same_key_and_params_replays_the_stored_response(sandbox):
    first = sandbox.charge(key="order-1")
    # amount_minor and lowercase currency normalize to the same parameters.
    second = sandbox.post(
        "/v1/charges", {"amount_minor": 1250, "currency": "eur", "reference": "order-1"}, key="order-1"
    )

    assert second.status_code == first.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    summary = sandbox.summary()["charges"]
    assert summary["total"] == 1
    assert summary["references_charged_more_than_once"] == []


def test_same_key_with_other_params_is_an_idempotency_error(sandbox):
    sandbox.charge(key="order-1", amount="12.50")

    response = sandbox.charge(key="order-1", amount="99.00")

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "idempotency_error"
    assert error["field"] == "Idempotency-Key"
    assert sandbox.summary()["charges"]["total"] == 1


def test_keys_of_charges_and_shipments_are_separate(sandbox):
    assert sandbox.charge(key="order-7", reference="order-7").status_code == 201
    shipment = sandbox.post("/v1/shipments", {"order_id": 7, "items": [{"sku": "MUG", "quantity": 1}]}, key="order-7")
    assert shipment.status_code == 201


def test_concurrent_requests_with_one_key_make_one_charge_and_get_409(sandbox):
    sandbox.set_faults(latency_ms=400)

    statuses = run_concurrently(6, lambda i: sandbox.charge(key="order-5", reference="order-5").status_code)

    assert sorted(statuses) == [201] + [409] * 5
    assert len(sandbox.charges(reference="order-5")) == 1
    sandbox.set_faults(latency_ms=0)
    replay = sandbox.charge(key="order-5", reference="order-5")
    assert replay.status_code == 201
    assert replay.json()["id"] == sandbox.charges(reference="order-5")[0]["id"]


def test_concurrent_requests_with_different_keys_all_charge(sandbox):
    statuses = run_concurrently(8, lambda i: sandbox.charge(key=f"sub-1-{i}", reference=f"sub-1-{i}").status_code)

    assert statuses == [201] * 8
    assert sandbox.summary()["charges"]["by_status"]["succeeded"] == 8


def test_forced_decline_is_recorded_replayed_and_announced(sandbox, webhook_receiver):
    response = sandbox.charge(key="order-9", reference="order-9", metadata={"force": "decline"})

    assert response.status_code == 402
    error = response.json()["error"]
    assert error["type"] == "card_declined"
    assert error["charge"]["id"].startswith("ch_")
    assert error["charge"]["status"] == "declined"
    replay = sandbox.charge(key="order-9", reference="order-9", metadata={"force": "decline"})
    assert (replay.status_code, replay.json()) == (402, response.json())
    assert sandbox.summary()["charges"]["by_reference"]["order-9"] == {"succeeded": 0, "declined": 1, "total": 1}
    [hook] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == error["charge"]["id"])
    assert hook.event["type"] == "charge.declined"


def test_decline_rate_declines_unless_forced_to_succeed(sandbox):
    sandbox.set_faults(decline_rate=1)

    assert sandbox.charge(key="a", reference="a").status_code == 402
    assert sandbox.charge(key="b", reference="b", metadata={"force": "succeed"}).status_code == 201


def test_webhook_is_delivered_with_a_valid_signature(sandbox, webhook_receiver):
    charge = sandbox.charge(key="order-3", reference="order-3").json()

    [hook] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == charge["id"])

    event = hook.event
    assert event["id"].startswith("evt_")
    assert event["type"] == "charge.succeeded"
    assert isinstance(event["created"], int)
    assert event["data"]["charge"] == charge
    assert hook.headers["Content-Type"] == "application/json"
    header = hook.headers["Sandbox-Signature"]
    assert verify(WEBHOOK_SECRET, hook.body, header)
    assert not verify(WEBHOOK_SECRET, hook.body.replace(b"succeeded", b"declined"), header)
    signed_at, _ = parse_header(header)
    assert not verify(WEBHOOK_SECRET, hook.body, header, now=signed_at + 301)
    assert not verify("wrong-secret", hook.body, header)


def test_webhook_delivery_is_retried_and_every_attempt_recorded(sandbox, webhook_receiver):
    webhook_receiver.fail_next = 2
    charge = sandbox.charge(key="order-4", reference="order-4").json()

    [hook] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == charge["id"])

    [event] = sandbox.get("/v1/events", charge_id=charge["id"]).json()["data"]
    assert event["id"] == hook.event["id"]
    assert event["delivery"]["status"] == "delivered"
    assert [attempt["status_code"] for attempt in event["delivery"]["attempts"]] == [500, 500, 200]
    assert sandbox.summary()["webhooks"]["by_status"]["delivered"] == 1


def test_unknown_charge_is_404(sandbox):
    response = sandbox.get("/v1/charges/ch_missing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
