"""Whole flows through the shop pages: sign in and out, order pages, cancelling, ownership."""

import html
import io

import pytest
from django.core.management import call_command
from django.test import Client

from orders.management.commands.seed_demo import DEMO_PASSWORD, DEMO_USERNAME
from orders.models import Order
from orders.services import place_order
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"


def page_text(response) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture
def shopper_client(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def pending_order(user, product):
    return place_order(owner=user, items=[("MUG-001", 2)])


@pytest.fixture
def processed_order(user, django_capture_on_commit_callbacks):
    """Place an order and publish the process_order its commit enqueued (run eagerly).

    What process_order itself enqueues (the charge) is never published: these
    tests stop at confirmed or rejected, without a payment provider.
    """

    def _place(quantity: int) -> Order:
        with django_capture_on_commit_callbacks() as callbacks:
            order = place_order(owner=user, items=[("MUG-001", quantity)])
        assert len(callbacks) == 1
        callbacks[0]()
        order.refresh_from_db()
        return order

    return _place


def test_home_lists_the_products(client, product):
    response = client.get("/")

    assert response.status_code == 200
    assert "MUG-001" in page_text(response)


@pytest.mark.parametrize("path", ["/orders/", "/orders/new/", "/orders/1/"])
def test_anonymous_shopper_is_sent_to_login(client, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"] == f"{LOGIN}?next={path}"


def test_anonymous_cancel_is_sent_to_login_and_cancels_nothing(client, pending_order):
    response = client.post(f"/orders/{pending_order.pk}/cancel/")

    assert response.status_code == 302
    assert response["Location"].startswith(LOGIN)
    pending_order.refresh_from_db()
    assert pending_order.status == Order.Status.PENDING


def test_login_page_renders_the_form(client):
    response = client.get(LOGIN)

    assert response.status_code == 200
    page = page_text(response)
    assert 'name="login"' in page  # a username or an email address (allauth)
    assert 'name="password"' in page
    assert "csrfmiddlewaretoken" in page


def test_login_with_demo_credentials_opens_my_orders(db):
    call_command("seed_demo", stdout=io.StringIO())
    client = Client(enforce_csrf_checks=True)
    token = client.get(LOGIN).context["csrf_token"]

    response = client.post(
        LOGIN, {"login": DEMO_USERNAME, "password": DEMO_PASSWORD, "csrfmiddlewaretoken": str(token)}
    )

    assert response.status_code == 302
    assert response["Location"] == "/orders/"
    orders_page = client.get("/orders/")
    assert orders_page.status_code == 200
    assert f"Sign out ({DEMO_USERNAME})" in page_text(orders_page)


def test_login_with_wrong_password_is_refused(client, user):
    response = client.post(LOGIN, {"login": user.username, "password": "wrong"})

    assert response.status_code == 200
    assert "username and/or password you specified are not correct" in page_text(response)
    assert client.get("/orders/").status_code == 302


def test_login_does_not_redirect_to_another_site(client, user):
    response = client.post(
        f"{LOGIN}?next=https://evil.example/", {"login": user.username, "password": "correct-horse-battery"}
    )

    assert response.status_code == 302
    assert response["Location"] == "/orders/"


def test_logout_via_post_signs_out(shopper_client):
    response = shopper_client.post("/accounts/logout/")

    assert response.status_code == 302
    assert response["Location"] == LOGIN
    assert shopper_client.get("/orders/").status_code == 302


def test_logout_via_get_only_asks_and_keeps_the_session(shopper_client):
    response = shopper_client.get("/accounts/logout/")

    # A page with a sign-out button: a link or an image elsewhere cannot sign the shopper out.
    assert response.status_code == 200
    assert 'method="post"' in page_text(response)
    assert shopper_client.get("/orders/").status_code == 200


def test_order_list_shows_only_my_orders(shopper_client, user, other_user, product):
    mine = place_order(owner=user, items=[("MUG-001", 1)])
    theirs = place_order(owner=other_user, items=[("MUG-001", 1)])

    response = shopper_client.get("/orders/")

    assert response.status_code == 200
    assert [order.pk for order in response.context["orders"]] == [mine.pk]
    assert f'href="/orders/{theirs.pk}/"' not in page_text(response)


def test_order_detail_shows_my_order(shopper_client, pending_order):
    response = shopper_client.get(f"/orders/{pending_order.pk}/")

    assert response.status_code == 200
    page = page_text(response)
    assert f"Order #{pending_order.pk}" in page
    assert "MUG-001" in page
    assert 'id="cancel-form"' in page


@pytest.mark.parametrize("path", ["/orders/{id}/", "/orders/{id}/cancel/"])
def test_other_owners_order_is_404(client, pending_order, path):
    client.force_login(UserFactory())
    method = client.post if path.endswith("cancel/") else client.get

    response = method(path.format(id=pending_order.pk))

    assert response.status_code == 404
    pending_order.refresh_from_db()
    assert pending_order.status == Order.Status.PENDING


@pytest.mark.parametrize("order_id", [999_999, 10**30])
def test_missing_order_is_404(shopper_client, order_id):
    assert shopper_client.get(f"/orders/{order_id}/").status_code == 404
    assert shopper_client.post(f"/orders/{order_id}/cancel/").status_code == 404


def test_cancel_pending_order_via_page(shopper_client, pending_order):
    response = shopper_client.post(f"/orders/{pending_order.pk}/cancel/", follow=True)

    assert response.redirect_chain == [(f"/orders/{pending_order.pk}/", 302)]
    assert f"Order #{pending_order.pk} cancelled." in page_text(response)
    pending_order.refresh_from_db()
    assert pending_order.status == Order.Status.CANCELLED


def test_cancel_confirmed_order_via_page_releases_stock(shopper_client, processed_order, product):
    order = processed_order(4)
    assert order.status == Order.Status.CONFIRMED

    shopper_client.post(f"/orders/{order.pk}/cancel/")

    order.refresh_from_db()
    assert order.status == Order.Status.CANCELLED
    product.refresh_from_db()
    assert product.stock == 10


def test_cancel_cancelled_order_via_page_shows_why_not(shopper_client, pending_order):
    shopper_client.post(f"/orders/{pending_order.pk}/cancel/")

    response = shopper_client.post(f"/orders/{pending_order.pk}/cancel/", follow=True)

    assert response.status_code == 200
    assert "an order in status cancelled cannot be cancelled" in page_text(response)
    assert pending_order.events.filter(to_status=Order.Status.CANCELLED).count() == 1


def test_cancel_rejected_order_via_page_shows_why_not(shopper_client, processed_order, product):
    order = processed_order(11)
    assert order.status == Order.Status.REJECTED

    response = shopper_client.post(f"/orders/{order.pk}/cancel/", follow=True)

    page = page_text(response)
    assert "an order in status rejected cannot be cancelled" in page
    assert 'id="cancel-form" hidden' in page
    order.refresh_from_db()
    assert order.status == Order.Status.REJECTED
    product.refresh_from_db()
    assert product.stock == 10


def test_cancel_via_get_is_refused(shopper_client, pending_order):
    response = shopper_client.get(f"/orders/{pending_order.pk}/cancel/")

    assert response.status_code == 405
    pending_order.refresh_from_db()
    assert pending_order.status == Order.Status.PENDING


def test_cancel_without_csrf_token_is_refused(user, pending_order):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    response = client.post(f"/orders/{pending_order.pk}/cancel/")

    assert response.status_code == 403
    pending_order.refresh_from_db()
    assert pending_order.status == Order.Status.PENDING


def test_order_form_without_csrf_token_is_refused(user, product):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    response = client.post("/orders/new/", {"qty-MUG-001": "1", "idempotency_key": "k"})

    assert response.status_code == 403
    assert Order.objects.count() == 0


def test_placing_an_order_via_page_shows_it_placed(shopper_client, product):
    response = shopper_client.post("/orders/new/", {"qty-MUG-001": "2", "idempotency_key": "page-1"}, follow=True)

    order = Order.objects.get()
    assert response.redirect_chain == [(f"/orders/{order.pk}/", 302)]
    assert f"Order #{order.pk} placed." in page_text(response)


def test_order_page_shows_the_receipt_once_paid(client, user, product, sandbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        order = place_order(owner=user, items=[("MUG-001", 2)])
    client.force_login(user)
    page = client.get(f"/orders/{order.pk}/").content.decode()
    payment = order.payments.get()
    assert 'data-final="1"' in page
    # The reference shown is the payment's own idempotency key (random, made when the charge was claimed).
    assert payment.idempotency_key.startswith("pay_")
    assert payment.provider_charge_id in page and payment.idempotency_key in page and "Succeeded" in page


def test_order_page_without_payment_says_so(client, user, product):
    # The after-commit publish is not run: the order stays pending, without a payment.
    order = place_order(owner=user, items=[("MUG-001", 1)])
    client.force_login(user)
    page = client.get(f"/orders/{order.pk}/").content.decode()
    assert "No payment yet" in page
    # Not final: the page keeps polling until the charge has an outcome.
    assert 'data-final="0"' in page
