"""The admin's stock forms submitted twice (a double click, a browser resubmit after a timeout)."""

import re

import pytest
from django.contrib.auth import get_user_model

from orders.models import StockMovement
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db


def test_a_double_submitted_delivery_is_received_once(client):
    staff = get_user_model().objects.create_superuser("boss", "boss@example.com", "pw-pw-pw-pw")
    client.force_login(staff)
    product = ProductFactory(sku="BOX", stock=10)
    url = f"/admin/orders/product/{product.pk}/receive-stock/"
    form = client.get(url)
    assert form.status_code == 200
    token = re.search(r'name="submission" value="([0-9a-f]{32})"', form.content.decode()).group(1)

    for _ in range(2):  # the same filled-in form, posted twice
        response = client.post(url, {"quantity": "100", "reason": "delivery note DN-123", "submission": token})
        assert response.status_code == 302

    # A second delivery is a new form: it is booked.
    again = re.search(r'name="submission" value="([0-9a-f]{32})"', client.get(url).content.decode()).group(1)
    assert again != token
    client.post(url, {"quantity": "5", "reason": "delivery note DN-124", "submission": again})

    product.refresh_from_db()
    assert product.stock == 115, (
        f"one delivery of 100 booked {StockMovement.objects.filter(product=product).count()} times"
    )
