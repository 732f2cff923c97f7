"""Bad input at the order form (POST /orders/new/): 400, the message in the page, nothing created."""

import html
import uuid

import pytest
from django.conf import settings

from orders.models import Order, OrderItem
from orders.services import MAX_ITEMS
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db

URL = "/orders/new/"


@pytest.fixture
def shopper_client(client, user):
    client.force_login(user)
    return client


def assert_form_refused(response, message: str) -> None:
    assert response.status_code == 400, response.content[:500]
    page = html.unescape(response.content.decode())
    assert message in page, page
    assert 'role="alert"' in page
    assert Order.objects.count() == 0
    assert OrderItem.objects.count() == 0


def key() -> str:
    return uuid.uuid4().hex


def test_new_order_page_renders_a_quantity_field_per_product_and_a_fresh_key(shopper_client, product):
    response = shopper_client.get(URL)

    assert response.status_code == 200
    page = response.content.decode()
    assert 'name="qty-MUG-001"' in page
    form = response.context["form"]
    assert len(form["idempotency_key"].value()) == 32


def test_valid_form_places_an_order_and_redirects_to_it(shopper_client, product, user):
    response = shopper_client.post(URL, {"qty-MUG-001": "2", "idempotency_key": key()})

    order = Order.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/orders/{order.pk}/"
    assert order.owner == user
    assert list(order.items.values_list("sku", "quantity")) == [("MUG-001", 2)]


def test_double_submit_with_the_same_key_places_one_order(shopper_client, product):
    form = {"qty-MUG-001": "2", "idempotency_key": key()}

    first = shopper_client.post(URL, form)
    second = shopper_client.post(URL, form)

    assert first.status_code == second.status_code == 302
    assert first["Location"] == second["Location"]
    assert Order.objects.count() == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param({"qty-NOPE": "1"}, "unknown sku: NOPE", id="unknown-sku-alone"),
        pytest.param({"qty-MUG-001": "1", "qty-NOPE": "1"}, "unknown sku: NOPE", id="unknown-sku-with-valid"),
        pytest.param({"qty-MUG-001": "0"}, "choose a quantity of at least one product", id="zero"),
        pytest.param({"qty-MUG-001": ""}, "choose a quantity of at least one product", id="blank"),
        pytest.param({}, "choose a quantity of at least one product", id="no-quantity-fields"),
        pytest.param({"qty-MUG-001": "-1"}, "greater than or equal to 0", id="negative"),
        pytest.param({"qty-MUG-001": "1.5"}, "Enter a whole number", id="fractional"),
        pytest.param({"qty-MUG-001": "1e3"}, "Enter a whole number", id="exponent"),
        pytest.param({"qty-MUG-001": "abc"}, "Enter a whole number", id="string"),
        pytest.param({"qty-MUG-001": "1001"}, "less than or equal to 1000", id="over-max"),
        pytest.param({"qty-MUG-001": "9" * 30}, "less than or equal to 1000", id="huge"),
        pytest.param({"qty-MUG-001": "9" * 5000}, "Enter a whole number", id="absurdly-long-number"),
        pytest.param({"qty-MUG-001": ["1", "2"]}, "each sku may appear only once: MUG-001", id="duplicated-key"),
    ],
)
def test_invalid_quantities_are_refused_with_the_message_in_the_page(shopper_client, product, data, message):
    response = shopper_client.post(URL, {**data, "idempotency_key": key()})

    assert_form_refused(response, message)
    product.refresh_from_db()
    assert product.stock == 10


def test_refused_form_keeps_the_shoppers_input_and_key(shopper_client, product):
    idempotency_key = key()

    response = shopper_client.post(URL, {"qty-MUG-001": "-3", "idempotency_key": idempotency_key})

    assert response.status_code == 400
    page = response.content.decode()
    assert 'value="-3"' in page
    assert f'value="{idempotency_key}"' in page


@pytest.mark.parametrize(
    ("idempotency_key", "message"),
    [
        pytest.param("k" * 65, "at most 64 characters", id="overlong"),
        pytest.param("k" * 10_000, "at most 64 characters", id="absurdly-long"),
        pytest.param("nul\x00inside", "Null characters are not allowed", id="nul"),
    ],
)
def test_invalid_idempotency_key_is_refused_with_the_message_in_the_page(
    shopper_client, product, idempotency_key, message
):
    response = shopper_client.post(URL, {"qty-MUG-001": "1", "idempotency_key": idempotency_key})

    assert_form_refused(response, message)


def test_form_refused_for_its_key_offers_a_fresh_key_that_places_the_order(shopper_client, product):
    refused = shopper_client.post(URL, {"qty-MUG-001": "1", "idempotency_key": "k" * 65})
    fresh_key = refused.context["form"]["idempotency_key"].value()
    assert fresh_key != "k" * 65
    assert f'value="{fresh_key}"' in refused.content.decode()

    response = shopper_client.post(URL, {"qty-MUG-001": "1", "idempotency_key": fresh_key})

    assert response.status_code == 302
    assert Order.objects.get().idempotency_key == fresh_key


def test_key_reused_with_other_items_is_refused_with_the_message_in_the_page(shopper_client, product):
    idempotency_key = key()
    assert shopper_client.post(URL, {"qty-MUG-001": "1", "idempotency_key": idempotency_key}).status_code == 302

    response = shopper_client.post(URL, {"qty-MUG-001": "2", "idempotency_key": idempotency_key})

    assert response.status_code == 400
    assert "already used for an order with other items" in html.unescape(response.content.decode())
    assert Order.objects.count() == 1
    assert list(Order.objects.get().items.values_list("quantity", flat=True)) == [1]


def test_more_products_than_an_order_may_hold_is_refused(shopper_client):
    products = ProductFactory.create_batch(MAX_ITEMS + 1)
    data = {f"qty-{product.sku}": "1" for product in products}

    response = shopper_client.post(URL, {**data, "idempotency_key": key()})

    assert_form_refused(response, f"at most {MAX_ITEMS} items")


def test_form_body_over_the_upload_limit_is_refused_with_400(shopper_client, product):
    padding = "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    response = shopper_client.post(
        URL,
        f"qty-MUG-001=1&idempotency_key={key()}&padding={padding}",
        content_type="application/x-www-form-urlencoded",
    )

    assert response.status_code == 400
    assert Order.objects.count() == 0


def test_form_with_too_many_fields_is_refused_with_400(shopper_client, product):
    body = "&".join(f"f{n}=1" for n in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    response = shopper_client.post(URL, body + "&qty-MUG-001=1", content_type="application/x-www-form-urlencoded")

    assert response.status_code == 400
    assert Order.objects.count() == 0


def test_anonymous_post_redirects_to_login_and_creates_nothing(client, product):
    response = client.post(URL, {"qty-MUG-001": "1", "idempotency_key": key()})

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    assert Order.objects.count() == 0
