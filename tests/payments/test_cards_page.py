"""The saved cards page (/accounts/cards/): the owner's cards only, each removable; someone else's is a 404."""

import html

import pytest
from django.utils import timezone

from payments.models import PaymentMethod
from tests.factories import PaymentMethodFactory

pytestmark = pytest.mark.django_db

CARDS = "/accounts/cards/"


def text(response) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture
def shopper(client, user):
    client.force_login(user)
    return client


def test_the_page_lists_the_owners_cards_without_removed_or_other_peoples(shopper, user, other_user):
    PaymentMethodFactory(owner=user, brand="visa", last4="4242", exp_month=3, exp_year=2031)
    PaymentMethodFactory(owner=user, last4="1111", removed_at=timezone.now())
    PaymentMethodFactory(owner=other_user, last4="9999")

    response = shopper.get(CARDS)

    page = text(response)
    assert response.status_code == 200
    assert "Visa ending in 4242" in page and "03/2031" in page
    assert "1111" not in page and "9999" not in page


def test_no_cards_says_so(shopper):
    assert "No saved cards." in text(shopper.get(CARDS))


def test_removing_a_card_hides_it_and_keeps_the_row(shopper, user):
    card = PaymentMethodFactory(owner=user)

    response = shopper.post(f"{CARDS}{card.pk}/remove/", follow=True)

    assert response.redirect_chain == [(CARDS, 302)]
    assert "Card removed." in text(response)
    card.refresh_from_db()
    assert card.removed_at is not None


@pytest.mark.parametrize("whose", ["another users", "removed", "missing"])
def test_removing_a_card_that_is_not_the_owners_is_a_404_and_changes_nothing(shopper, user, other_user, whose):
    card = {
        "another users": lambda: PaymentMethodFactory(owner=other_user),
        "removed": lambda: PaymentMethodFactory(owner=user, removed_at=timezone.now()),
        "missing": lambda: PaymentMethodFactory.build(pk=987654),
    }[whose]()
    before = list(PaymentMethod.objects.values_list("pk", "removed_at"))

    assert shopper.post(f"{CARDS}{card.pk}/remove/").status_code == 404
    assert list(PaymentMethod.objects.values_list("pk", "removed_at")) == before


@pytest.mark.parametrize("path", ["abc/remove/", "-1/remove/", "99999999999999999999/remove/", "1/remove/x"])
def test_a_malformed_card_id_is_a_404(shopper, path):
    assert shopper.post(CARDS + path).status_code == 404


def test_the_page_needs_a_signed_in_shopper_and_refuses_a_get_to_remove(client, user):
    assert client.get(CARDS)["Location"].startswith("/accounts/login/")
    card = PaymentMethodFactory(owner=user)
    client.force_login(user)
    assert client.get(f"{CARDS}{card.pk}/remove/").status_code == 405


def test_the_account_page_links_to_the_cards(shopper):
    assert f'href="{CARDS}"' in text(shopper.get("/accounts/profile/"))
