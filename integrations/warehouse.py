"""The fulfillment warehouse's client: shipments, once per idempotency key.

Connection errors, timeouts, the call deadline, 408/409/425/429 (not now) and 5xx become
ProviderUnavailable, which is retryable; any other 4xx is ProviderRejected, permanent.
"""

from dataclasses import dataclass

from django.conf import settings

from . import http
from .errors import ProviderRejected, ProviderUnavailable, is_transient

__all__ = ["Shipment", "create_shipment"]


@dataclass(frozen=True)
class Shipment:
    id: str
    status: str


def create_shipment(*, order_id: int, items: list[dict], idempotency_key: str) -> Shipment:
    """Hand an order to the warehouse, once per idempotency key. Raises ProviderRejected or ProviderUnavailable."""
    reply = http.send(
        "POST",
        f"{settings.FULFILLMENT_API_URL.rstrip('/')}/v1/shipments",
        json={"order_id": order_id, "items": items},
        headers={"Idempotency-Key": idempotency_key},
    )
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"/v1/shipments: HTTP {reply.status_code}")
    if reply.status_code not in (200, 201):
        raise ProviderRejected(f"shipment {idempotency_key}: HTTP {reply.status_code} {reply.error()}")
    data = reply.json()
    return Shipment(id=data["id"], status=data["status"])
