"""What a shopper keeps in their account besides what django-allauth keeps (email addresses, passwords)."""

import hashlib

from django.conf import settings
from django.db import models


class Address(models.Model):
    """A saved shipping address. An order copies it when it is placed, so editing or deleting it moves no order."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="addresses")
    name = models.CharField(max_length=100)
    line1 = models.CharField("address", max_length=200)
    line2 = models.CharField("address (line 2)", max_length=200, blank=True, default="")
    postal_code = models.CharField(max_length=20)
    city = models.CharField(max_length=100)
    # ISO 3166-1 alpha-2, upper case.
    country = models.CharField(max_length=2)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return ", ".join(
            part
            for part in (self.name, self.line1, self.line2, f"{self.postal_code} {self.city}", self.country)
            if part
        )

    def snapshot(self) -> dict[str, str]:
        """The address as an order keeps it."""
        return {field: getattr(self, field) for field in ADDRESS_FIELDS}


ADDRESS_FIELDS = ("name", "line1", "line2", "postal_code", "city", "country")


class ApiToken(models.Model):
    """A bearer token for the API, named by its owner. Only its SHA-256 digest is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True, default="")
    digest = models.CharField(max_length=64, unique=True)
    # The key of the page form that made it: two submits of one form (a double click) make one token.
    form_key = models.CharField(max_length=32, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # The table it had in the orders app (moved without copying a row).
        db_table = "orders_apitoken"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "form_key"], condition=~models.Q(form_key=""), name="api_token_once_per_form"
            ),
        ]

    def __str__(self) -> str:
        return f"token {self.name or self.pk} for {self.user}"

    @staticmethod
    def digest_of(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()
