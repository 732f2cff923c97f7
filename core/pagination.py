"""Limit/offset pagination for every API list, with bounds: an absurd value is a 422, not a database error."""

from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest
from ninja import Field, Schema
from ninja.pagination import LimitOffsetPagination

from core.db import one_snapshot


def bounded_pagination(
    *, default_limit: int, max_limit: int = 100, one_moment: bool = False
) -> type[LimitOffsetPagination]:
    """A LimitOffsetPagination whose `limit` defaults to `default_limit` and is at most `max_limit`.

    `one_moment`: the page and what its queryset prefetches are read in one snapshot (core.db.one_snapshot), so
    rows and their relations agree.
    """

    class Input(Schema):
        limit: int = Field(default_limit, ge=1, le=max_limit)
        offset: int = Field(0, ge=0, le=2**31 - 1)

    class BoundedPagination(LimitOffsetPagination):
        def paginate_queryset(self, queryset: QuerySet, pagination: Any, request: HttpRequest, **params: Any) -> Any:
            if not one_moment:
                return super().paginate_queryset(queryset, pagination, request, **params)
            with one_snapshot():
                page = super().paginate_queryset(queryset, pagination, request, **params)
                page[self.items_attribute] = list(page[self.items_attribute])
            return page

    BoundedPagination.Input = Input  # type: ignore[misc,assignment]
    return BoundedPagination
