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


def _charge(reference: str, amount_minor: int = 100) -> dict:
    params = {"amount_minor": amount_minor, "currency": "EUR", "reference": reference, "description": None}
    params["metadata"] = {}
    ledger.claim_idempotency_key(scope=ledger.CHARGES, key=reference, request_fingerprint=ledger.fingerprint(params))
    ledger.create_charge(idempotency_key=reference, params=params, current_faults=faults.get_faults())
    [charge] = ledger.list_charges(reference=reference)
    return charge


def test_charges_are_listed_from_a_time_and_paged_with_a_cursor(ledger_file):
    charges = [_charge(f"pay-{number}") for number in range(5)]
    with db.write() as conn:
        for created, charge in zip((100, 200, 300, 300, 400), charges, strict=True):
            conn.execute("UPDATE charges SET created = ? WHERE id = ?", (created, charge["id"]))

    since_300 = ledger.list_charges(created_gte=300)
    first_page = ledger.list_charges(created_gte=200, limit=2)
    second_page = ledger.list_charges(created_gte=200, starting_after=first_page[-1]["id"], limit=2)
    last_page = ledger.list_charges(created_gte=200, starting_after=second_page[-1]["id"], limit=2)

    assert [charge["reference"] for charge in since_300] == ["pay-2", "pay-3", "pay-4"]
    assert [charge["reference"] for charge in first_page + second_page] == ["pay-1", "pay-2", "pay-3", "pay-4"]
    assert last_page == []


def test_a_cursor_that_names_no_charge_is_refused(ledger_file):
    _charge("pay-1")

    with pytest.raises(ledger.UnknownCharge):
        ledger.list_charges(starting_after="ch_unknown")


def test_a_ledger_file_made_before_payment_methods_gains_the_column_and_keeps_its_charges(ledger_file):
    import sqlite3

    old = sqlite3.connect(ledger_file)
    old.executescript(
        "CREATE TABLE charges (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,"
        " amount_minor INTEGER NOT NULL, currency TEXT NOT NULL, reference TEXT NOT NULL, description TEXT,"
        " metadata TEXT NOT NULL, idempotency_key TEXT NOT NULL, failure_code TEXT, created INTEGER NOT NULL);"
        "INSERT INTO charges (id, status, amount_minor, currency, reference, metadata, idempotency_key, created)"
        " VALUES ('ch_old', 'succeeded', 100, 'EUR', 'order-1', '{}', 'order-1', 1);"
    )
    old.commit()
    old.close()

    assert ledger.get_charge(charge_id="ch_old")["payment_method"] is None
    method = ledger.create_payment_method(
        params={"number": "4242424242424242", "exp_month": 1, "exp_year": 2040, "metadata": {}}
    )
    params = {"amount_minor": 100, "currency": "EUR", "reference": "order-2", "description": None, "metadata": {}}
    created = ledger.create_charge(
        idempotency_key="order-2", params={**params, "payment_method": method["id"]}, current_faults=faults.get_faults()
    )
    assert created.status == 201
    assert ledger.summarize_ledger()["charges"]["total"] == 2


def test_a_ledger_file_made_before_refunds_gains_the_table_and_refunds_its_charges(ledger_file):
    import sqlite3

    old = sqlite3.connect(ledger_file)
    old.executescript(
        "CREATE TABLE charges (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,"
        " amount_minor INTEGER NOT NULL, currency TEXT NOT NULL, reference TEXT NOT NULL, description TEXT,"
        " metadata TEXT NOT NULL, idempotency_key TEXT NOT NULL, failure_code TEXT, created INTEGER NOT NULL,"
        " payment_method TEXT);"
        "INSERT INTO charges (id, status, amount_minor, currency, reference, metadata, idempotency_key, created)"
        " VALUES ('ch_old', 'succeeded', 1000, 'EUR', 'order-1', '{}', 'order-1', 1);"
    )
    old.commit()
    old.close()

    assert ledger.get_charge(charge_id="ch_old")["amount_refunded"] == "0.00"
    params = {"charge": "ch_old", "amount_minor": 400, "currency": "EUR", "reference": "order-1"}
    ledger.claim_idempotency_key(scope=ledger.REFUNDS, key="r-1", request_fingerprint=ledger.fingerprint(params))
    created = ledger.create_refund(idempotency_key="r-1", params=params, current_faults=faults.get_faults())

    assert created.status == 201
    [refund] = ledger.list_refunds(charge_id="ch_old")
    assert (refund["amount"], refund["status"]) == ("4.00", "succeeded")
    charge = ledger.get_charge(charge_id="ch_old")
    assert (charge["amount_refunded"], charge["refunded"]) == ("4.00", False)
    # No SHOP_WEBHOOK_URL: the event is recorded but not sent.
    assert ledger.summarize_ledger()["webhooks"]["by_status"]["skipped"] == 1
