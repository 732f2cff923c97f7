"""The only code that talks to the payment provider and the fulfillment warehouse.

Every call carries an idempotency key derived from our own stable ids, so a retry
of the same call can never act twice on the provider's side. Connection errors,
timeouts, 409 (the same key is in flight) and 5xx become ProviderUnavailable, which
is retryable; a decline or any other 4xx is permanent.
"""

import logging
from dataclasses import dataclass
from decimal import Decimal

import requests
from django.conf import settings

logger = logging.getLogger(__name__)


class ProviderUnavailable(ConnectionError):
    """Transient: the provider could not be reached or did not finish. Retry with the same key."""


class ProviderRejected(Exception):
    """Permanent: the provider refused the request. Retrying changes nothing."""


class CardDeclined(ProviderRejected):
    def __init__(self, charge_id: str, reason: str = "card_declined"):
        self.charge_id = charge_id
        self.reason = reason
        super().__init__(f"charge {charge_id or '?'} declined: {reason}")


@dataclass(frozen=True)
class Charge:
    id: str
    status: str
    amount: Decimal
    currency: str
    reference: str


@dataclass(frozen=True)
class Shipment:
    id: str
    status: str


_session = requests.Session()


def _timeouts() -> tuple[float, float]:
    return (settings.PROVIDER_CONNECT_TIMEOUT, settings.PROVIDER_READ_TIMEOUT)


def _post(base_url: str, path: str, *, json: dict, idempotency_key: str) -> requests.Response:
    try:
        response = _session.post(
            f"{base_url.rstrip('/')}{path}",
            json=json,
            headers={"Idempotency-Key": idempotency_key},
            timeout=_timeouts(),
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ProviderUnavailable(f"{path}: {type(exc).__name__}") from exc
    if response.status_code == 409 or response.status_code >= 500:
        raise ProviderUnavailable(f"{path}: HTTP {response.status_code}")
    return response


def _error_of(response: requests.Response) -> dict:
    try:
        return response.json().get("error") or {}
    except ValueError:
        return {}


def _charge_from(data: dict) -> Charge:
    return Charge(
        id=data["id"],
        status=data["status"],
        amount=Decimal(str(data["amount"])),
        currency=data["currency"],
        reference=data.get("reference", ""),
    )


def charge(*, amount: Decimal, currency: str, reference: str, idempotency_key: str) -> Charge:
    """Charge `amount` once per idempotency key. Raises CardDeclined, ProviderRejected or ProviderUnavailable."""
    response = _post(
        settings.PAYMENT_PROVIDER_URL,
        "/v1/charges",
        json={"amount": str(amount), "currency": currency, "reference": reference},
        idempotency_key=idempotency_key,
    )
    if response.status_code == 402:
        error = _error_of(response)
        raise CardDeclined((error.get("charge") or {}).get("id", ""), error.get("type", "card_declined"))
    if response.status_code not in (200, 201):
        raise ProviderRejected(f"charge {idempotency_key}: HTTP {response.status_code} {_error_of(response)}")
    return _charge_from(response.json())


def retrieve_charge(*, charge_id: str) -> Charge:
    """Fetch a charge as the provider has it (webhooks are verified against this)."""
    try:
        response = _session.get(
            f"{settings.PAYMENT_PROVIDER_URL.rstrip('/')}/v1/charges/{charge_id}", timeout=_timeouts()
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ProviderUnavailable(f"retrieve {charge_id}: {type(exc).__name__}") from exc
    if response.status_code >= 500:
        raise ProviderUnavailable(f"retrieve {charge_id}: HTTP {response.status_code}")
    if response.status_code != 200:
        raise ProviderRejected(f"retrieve {charge_id}: HTTP {response.status_code}")
    return _charge_from(response.json())


def create_shipment(*, order_id: int, items: list[dict], idempotency_key: str) -> Shipment:
    """Hand an order to the warehouse, once per idempotency key."""
    response = _post(
        settings.FULFILLMENT_API_URL,
        "/v1/shipments",
        json={"order_id": order_id, "items": items},
        idempotency_key=idempotency_key,
    )
    if response.status_code not in (200, 201):
        raise ProviderRejected(f"shipment {idempotency_key}: HTTP {response.status_code} {_error_of(response)}")
    data = response.json()
    return Shipment(id=data["id"], status=data["status"])
