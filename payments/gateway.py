"""Moved to integrations/provider.py and integrations/warehouse.py.

These names stay until every caller imports from there.
"""

from integrations.provider import CardDeclined, Charge, ProviderRejected, ProviderUnavailable, charge, retrieve_charge
from integrations.warehouse import Shipment, create_shipment

__all__ = [
    "CardDeclined",
    "Charge",
    "ProviderRejected",
    "ProviderUnavailable",
    "Shipment",
    "charge",
    "create_shipment",
    "retrieve_charge",
]
