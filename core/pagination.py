"""Limit/offset pagination for every API list, with bounds: an absurd value is a 422, not a database error."""

from ninja import Field, Schema
from ninja.pagination import LimitOffsetPagination


def bounded_pagination(*, default_limit: int, max_limit: int = 100) -> type[LimitOffsetPagination]:
    """A LimitOffsetPagination whose `limit` defaults to `default_limit` and is at most `max_limit`."""

    class Input(Schema):
        limit: int = Field(default_limit, ge=1, le=max_limit)
        offset: int = Field(0, ge=0, le=2**31 - 1)

    return type("BoundedPagination", (LimitOffsetPagination,), {"Input": Input})
