"""The addresses API: saved shipping addresses, listed, added and deleted by their owner."""

from datetime import datetime
from typing import Annotated

from django.db.models import QuerySet
from django.http import Http404
from ninja import Router, Schema, Status
from ninja.pagination import paginate
from pydantic import ConfigDict, StringConstraints

from core.pagination import bounded_pagination
from core.types import ApiRequest

from . import selectors, services
from .models import Address

router = Router(tags=["addresses"])

Pagination = bounded_pagination(default_limit=100)
# No control characters; the service trims and checks the rest (accounts.services.clean_address).
Text = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]


class AddressIn(Schema):
    model_config = ConfigDict(extra="forbid")

    name: Text
    line1: Text
    line2: Text = ""
    postal_code: Text
    city: Text
    # ISO 3166-1 alpha-2 (either case).
    country: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2}$")]


class AddressOut(Schema):
    id: int
    name: str
    line1: str
    line2: str
    postal_code: str
    city: str
    country: str
    created_at: datetime


class ErrorOut(Schema):
    detail: list[dict] | str


@router.get("/addresses/", response=list[AddressOut], summary="List my saved addresses")
@paginate(Pagination)
def list_addresses(request: ApiRequest) -> QuerySet[Address]:
    return selectors.addresses_for(owner=request.auth)


@router.post("/addresses/", response={201: AddressOut, 422: ErrorOut}, summary="Save an address")
def add_address(request: ApiRequest, payload: AddressIn) -> Status[Address]:
    return Status(201, services.add_address(owner=request.auth, **payload.dict()))


@router.delete(
    "/addresses/{address_id}/",
    response={204: None, 404: ErrorOut},
    summary="Delete one of my saved addresses (orders keep their copy)",
)
def delete_address(request: ApiRequest, address_id: int) -> Status[None]:
    try:
        services.delete_address(owner=request.auth, address_id=address_id)
    except services.UnknownAddress:
        raise Http404("no such address") from None
    return Status(204, None)
