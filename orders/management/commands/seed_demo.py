import os
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.services import confirm_email_of
from orders.models import Product
from payments.models import Plan

DEMO_PRODUCTS = [
    ("MUG-001", "Enamel mug", Decimal("12.50"), 100),
    ("TEE-001", "Organic T-shirt", Decimal("24.00"), 50),
    ("BAG-001", "Canvas tote bag", Decimal("15.00"), 40),
    ("NB-001", "Dot-grid notebook", Decimal("8.90"), 200),
    ("CAP-001", "Baseball cap", Decimal("19.00"), 5),
]
DEMO_DESCRIPTIONS = {
    "MUG-001": "A white enamel mug with a blue rim, 350 ml.\n\nLight and hard to break: for camping, fine at a desk.",
    "TEE-001": "A plain T-shirt of organic cotton, 180 g/m².\n\nCut straight; wash at 30 °C.",
    "BAG-001": "A tote bag of heavy canvas with long handles.\n\nHolds a week's shopping or a laptop and its charger.",
    "NB-001": "A5, 160 pages of dot-grid paper, 100 g/m², that fountain pens do not bleed through.",
    "CAP-001": "A six-panel cotton cap with an adjustable strap. One size.",
}
# Demo accounts for a local run; override the passwords through the environment anywhere else.
DEMO_PLANS = [
    ("basic", "Basic box", Decimal("9.00"), Plan.Interval.MONTH),
    ("pro", "Pro box", Decimal("29.00"), Plan.Interval.MONTH),
    ("annual", "Annual box", Decimal("290.00"), Plan.Interval.YEAR),
]
DEMO_USERNAME = "demo"
DEMO_PASSWORD = os.environ.get("DEMO_PASSWORD", "demo-shopper-pass")
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = os.environ.get("DEMO_ADMIN_PASSWORD", "admin-operator-pass")


class Command(BaseCommand):
    help = "Create demo products, a demo shopper and a staff user. Safe to run twice."

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        for sku, name, price, stock in DEMO_PRODUCTS:
            description = DEMO_DESCRIPTIONS[sku]
            product, _ = Product.objects.get_or_create(
                sku=sku, defaults={"name": name, "price": price, "stock": stock, "description": description}
            )
            if not product.description:  # seeded before products had descriptions
                product.description = description
                product.save(update_fields=["description"])
        for code, name, price, interval in DEMO_PLANS:
            Plan.objects.get_or_create(code=code, defaults={"name": name, "price": price, "interval": interval})
        users = get_user_model().objects
        if not users.filter(username=DEMO_USERNAME).exists():
            confirm_email_of(users.create_user(DEMO_USERNAME, "demo@example.com", DEMO_PASSWORD))
        if not users.filter(username=ADMIN_USERNAME).exists():
            confirm_email_of(users.create_superuser(ADMIN_USERNAME, "admin@example.com", ADMIN_PASSWORD))
        self.stdout.write(
            f"Demo data ready: {Product.objects.count()} products, {Plan.objects.count()} plans.\n"
            f"  shopper: {DEMO_USERNAME} / {DEMO_PASSWORD}\n"
            f"  staff:   {ADMIN_USERNAME} / {ADMIN_PASSWORD}  (/admin/)"
        )
