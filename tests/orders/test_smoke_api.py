import pytest

from orders.models import Order

pytestmark = pytest.mark.django_db


def test_post_order_answers_pending_and_the_eager_chain_fulfils_it(
    api_client, product, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(
            "/api/orders/", {"items": [{"sku": "MUG-001", "quantity": 2}]}, content_type="application/json"
        )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "pending"
    order = Order.objects.get(pk=body["id"])
    assert order.status == "fulfilled"
    assert order.payments.get().status == "succeeded"
    product.refresh_from_db()
    assert product.stock == 8
