"""The catalogue (/) and a product's page: search by name or sku, stock in words, never a 5xx."""

import html

import pytest

from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db


def text(response) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture
def catalogue(db):
    return {
        "mug": ProductFactory(sku="MUG-001", name="Enamel mug", stock=100, description="A mug.\n\nFor tea."),
        "tee": ProductFactory(sku="TEE-001", name="Organic T-shirt", stock=5),
        "cap": ProductFactory(sku="CAP-001", name="Baseball cap", stock=1),
        "bag": ProductFactory(sku="BAG-001", name="Canvas tote bag", stock=0),
    }


def skus_shown(response) -> list[str]:
    return [product.sku for product in response.context["page"]]


def test_the_home_page_is_the_catalogue_with_every_product_by_name(client, catalogue):
    response = client.get("/")

    assert response.status_code == 200
    assert skus_shown(response) == ["CAP-001", "BAG-001", "MUG-001", "TEE-001"]
    assert 'action="/orders/cart/add/"' in text(response)


@pytest.mark.parametrize(
    ("search", "found"),
    [
        ("mug", ["MUG-001"]),
        ("MUG", ["MUG-001"]),
        ("tee-0", ["TEE-001"]),
        ("001", ["CAP-001", "BAG-001", "MUG-001", "TEE-001"]),
        ("  cap  ", ["CAP-001"]),
        ("tote", ["BAG-001"]),
        ("nothing like it", []),
    ],
)
def test_search_finds_products_by_name_or_sku_in_any_case(client, catalogue, search, found):
    response = client.get("/", {"q": search})

    assert response.status_code == 200
    assert skus_shown(response) == found
    if not found:
        assert "No product matches “nothing like it”" in text(response)


@pytest.mark.parametrize(
    "search",
    ["%", "_", "'; DROP TABLE orders_product; --", "\\", "<script>alert(1)</script>", "é" * 100, "\u202e", "%00"],
)
def test_hostile_searches_match_literally_and_never_fail(client, catalogue, search):
    response = client.get("/", {"q": search})

    assert response.status_code == 200
    assert skus_shown(response) == []
    assert "<script>alert(1)</script>" not in response.content.decode()


def test_a_search_longer_than_the_field_is_a_form_error(client, catalogue):
    response = client.get("/", {"q": "x" * 101})

    assert response.status_code == 400
    assert "Ensure this value has at most 100 characters" in text(response)
    assert len(skus_shown(response)) == 4  # the whole catalogue, not a 5xx


def test_catalogue_pages_hold_24_products_and_a_bad_page_number_shows_the_first_or_last(client):
    ProductFactory.create_batch(30)
    assert len(skus_shown(client.get("/"))) == 24
    assert len(skus_shown(client.get("/", {"page": "2"}))) == 6
    for page in ("abc", "-1", "0", "99999999999999999999", "1e3"):
        response = client.get("/", {"page": page})
        assert response.status_code == 200, page
        assert len(skus_shown(response)) in (24, 6)


@pytest.mark.parametrize(
    ("sku", "label"),
    [("MUG-001", "In stock"), ("TEE-001", "Only 5 left"), ("CAP-001", "Only 1 left"), ("BAG-001", "Sold out")],
)
def test_stock_is_shown_in_words_on_the_catalogue_and_the_product_page(client, catalogue, sku, label):
    listing = text(client.get("/", {"q": sku}))
    page = client.get("/orders/product/", {"sku": sku})

    assert label in listing
    assert page.status_code == 200
    assert label in text(page)


def test_a_sold_out_product_offers_no_add_to_cart_button(client, catalogue):
    assert "Add Canvas tote bag to the cart" not in text(client.get("/"))
    assert "Add Enamel mug to the cart" in text(client.get("/"))
    assert "Add to cart" not in text(client.get("/orders/product/", {"sku": "BAG-001"}))


def test_the_product_page_shows_name_description_paragraphs_and_price(client, catalogue):
    response = client.get("/orders/product/", {"sku": "MUG-001"})

    page = text(response)
    assert "<h1>Enamel mug</h1>" in page
    assert "<p>A mug.</p>" in page and "<p>For tea.</p>" in page
    assert "€10.00" in page


@pytest.mark.parametrize("sku", ["", "NOPE", "x" * 65, "mug-001", "MUG-001 ", "../MUG-001", "%00"])
def test_an_unknown_product_is_a_404(client, catalogue, sku):
    assert client.get("/orders/product/", {"sku": sku}).status_code == 404


def test_the_product_page_without_a_sku_is_a_404(client, catalogue):
    assert client.get("/orders/product/").status_code == 404


def test_the_catalogue_refuses_a_post(client, catalogue):
    assert client.post("/").status_code == 405
