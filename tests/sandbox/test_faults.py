import pytest
import requests

from tests.concurrency import run_concurrently
from tests.sandbox_fixtures import SandboxClient, SandboxProcess


def test_faults_start_from_the_environment_and_change_at_runtime(sandbox):
    initial = sandbox.get("/v1/faults").json()
    assert initial == {
        "error_rate": 0.0,
        "latency_ms": 0,
        "timeout_rate": 0.0,
        "decline_rate": 0.0,
        "timeout_seconds": 30.0,
        "fail_next": 0,
        "fail_after_charge_next": 0,
        "fail_after_shipment_next": 0,
        "fail_after_refund_next": 0,
    }

    updated = sandbox.set_faults(error_rate=0.2, latency_ms=5)

    assert updated == {**initial, "error_rate": 0.2, "latency_ms": 5}
    assert sandbox.get("/v1/faults").json() == updated
    assert sandbox.post("/v1/reset").json()["faults"] == initial


def test_fail_next_fails_exactly_n_requests_then_succeeds(sandbox):
    sandbox.set_faults(fail_next=3)

    statuses = [sandbox.charge(key="order-8", reference="order-8").status_code for _ in range(4)]

    assert statuses == [503, 503, 503, 201]
    assert len(sandbox.charges(reference="order-8")) == 1
    assert sandbox.get("/v1/faults").json()["fail_next"] == 0


def test_fail_next_is_exact_under_concurrency(sandbox):
    sandbox.set_faults(fail_next=5)

    statuses = run_concurrently(10, lambda i: sandbox.charge(key=f"k-{i}", reference=f"r-{i}").status_code)

    assert sorted(statuses) == [201] * 5 + [503] * 5
    assert sandbox.summary()["charges"]["total"] == 5


def test_fail_next_applies_to_shipments_too(sandbox):
    sandbox.set_faults(fail_next=1)
    body = {"order_id": 1, "items": [{"sku": "MUG", "quantity": 1}]}

    assert sandbox.post("/v1/shipments", body, key="s1").status_code == 503
    assert sandbox.post("/v1/shipments", body, key="s1").status_code == 201


def test_injected_errors_record_nothing_until_turned_off_at_runtime(sandbox):
    sandbox.set_faults(error_rate=1)

    failed = sandbox.charge(key="order-2", reference="order-2")

    assert failed.status_code == 503
    assert failed.json()["error"]["type"] == "api_error"
    summary = sandbox.summary()
    assert summary["charges"]["total"] == 0
    assert summary["idempotency_keys"]["total"] == 0
    sandbox.set_faults(error_rate=0)
    assert sandbox.charge(key="order-2", reference="order-2").status_code == 201


def test_timeout_outlasts_the_client_then_answers_504_without_charging(sandbox):
    sandbox.set_faults(timeout_rate=1, timeout_seconds=0.6)

    with pytest.raises(requests.ReadTimeout):
        sandbox.post(
            "/v1/charges", {"amount": "1.00", "currency": "EUR", "reference": "t"}, key="t-1", timeout=(3, 0.2)
        )
    late = sandbox.charge(key="t-1", reference="t")

    assert late.status_code == 504
    assert sandbox.summary()["charges"]["total"] == 0
    sandbox.set_faults(timeout_rate=0)
    assert sandbox.charge(key="t-1", reference="t").status_code == 201


def test_lost_response_retry_with_the_same_key_gets_the_recorded_charge(sandbox, webhook_receiver):
    sandbox.set_faults(fail_after_charge_next=1)

    lost = sandbox.charge(key="order-6", reference="order-6")
    retry = sandbox.charge(key="order-6", reference="order-6")

    assert lost.status_code == 500
    assert lost.json()["error"]["code"] == "response_lost"
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    [recorded] = sandbox.charges(reference="order-6")
    assert retry.json()["id"] == recorded["id"]
    # The provider acted, so the shop hears about it even though the response was lost.
    webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == recorded["id"])


@pytest.mark.sandbox_process  # starts, stops and restarts `python -m sandbox` itself
def test_ledger_and_faults_survive_a_restart_and_workers_share_them(tmp_path):
    db_path = tmp_path / "sandbox.sqlite3"
    first = SandboxProcess(db_path=db_path, log_path=tmp_path / "first.log", env={"SANDBOX_WORKERS": "2"})
    try:
        client = SandboxClient(first.url)
        charge = client.charge(key="order-1", reference="order-1").json()
        client.set_faults(fail_next=5, decline_rate=0.5)
        # Concurrent requests land on both workers; the counter lives in the database, so it stays exact.
        statuses = run_concurrently(4, lambda i: client.charge(key=f"k{i}", reference=f"r{i}").status_code)
        assert statuses == [503] * 4
    finally:
        first.stop()

    second = SandboxProcess(db_path=db_path, log_path=tmp_path / "second.log", env={"SANDBOX_DECLINE_RATE": "0"})
    try:
        client = SandboxClient(second.url)
        assert client.charges(reference="order-1") == [charge]
        faults = client.get("/v1/faults").json()
        # Runtime changes persist; an explicitly set environment variable wins at start.
        assert (faults["fail_next"], faults["decline_rate"]) == (1, 0.0)
        assert client.charge(key="order-1", reference="order-1").status_code == 503
        assert client.charge(key="order-1", reference="order-1").json() == charge
    finally:
        second.stop()
