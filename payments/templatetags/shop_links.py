"""Absolute links to the shop's pages, for emails: rendered by workers, which have no request to take the host from."""

from typing import Any

from django import template
from django.conf import settings
from django.urls import reverse

register = template.Library()


@register.simple_tag
def shop_url(view_name: str, *args: Any) -> str:
    """SHOP_URL followed by the page's path: `{% shop_url "payments:subscriptions" %}`."""
    return settings.SHOP_URL.rstrip("/") + reverse(view_name, args=args)
