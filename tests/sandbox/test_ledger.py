"""The ledger's functions in-process, on a temporary SQLite file (no server)."""

import pytest

from sandbox import db, faults, ledger
from sandbox.config import get_settings


@pytest.fixture
def ledger_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOX_DB", str(tmp_path / "ledger.sqlite3"))
    for name in ("SANDBOX_ERROR_RATE", "SANDBOX_DECLINE_RATE", "SHOP_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield tmp_path / "ledger.sqlite3"
    db.close()
    get_settings.cache_clear()


def test_a_claim_abandoned_by_a_dead_process_is_released_at_start(ledger_file):
    fingerprint = ledger.fingerprint({"amount_minor": 100})
    first = ledger.claim_idempotency_key(scope=ledger.CHARGES, key="order-1", request_fingerprint=fingerprint)
    stuck = ledger.claim_idempotency_key(scope=ledger.CHARGES, key="order-1", request_fingerprint=fingerprint)

    released = ledger.release_abandoned_claims()

    assert (first.outcome, stuck.outcome, released) == (ledger.ClaimOutcome.CLAIMED, ledger.ClaimOutcome.IN_FLIGHT, 1)
    again = ledger.claim_idempotency_key(scope=ledger.CHARGES, key="order-1", request_fingerprint=fingerprint)
    assert again.outcome is ledger.ClaimOutcome.CLAIMED


def test_a_charge_and_its_stored_response_are_written_together(ledger_file):
    params = {"amount_minor": 995, "currency": "EUR", "reference": "order-3", "description": None, "metadata": {}}
    ledger.claim_idempotency_key(scope=ledger.CHARGES, key="order-3", request_fingerprint=ledger.fingerprint(params))

    created = ledger.create_charge(idempotency_key="order-3", params=params, current_faults=faults.get_faults())

    replay = ledger.claim_idempotency_key(
        scope=ledger.CHARGES, key="order-3", request_fingerprint=ledger.fingerprint(params)
    )
    assert (replay.outcome, replay.status, replay.body) == (ledger.ClaimOutcome.REPLAY, 201, created.body)
    [charge] = ledger.list_charges(reference="order-3")
    assert charge["amount"] == "9.95"
    # No SHOP_WEBHOOK_URL: the event is recorded but not sent.
    assert ledger.summarize_ledger()["webhooks"]["by_status"]["skipped"] == 1
