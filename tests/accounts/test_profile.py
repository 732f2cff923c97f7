"""The profile page: saved addresses added and deleted by their owner only, hostile input refused."""

import pytest

from accounts import selectors, services
from accounts.models import Address
from tests.factories import AddressFactory, UserFactory

pytestmark = pytest.mark.django_db

GOOD = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "line2": "",
    "postal_code": "SW1Y 4JH",
    "city": "London",
    "country": "gb",
}


def test_the_profile_page_needs_a_signed_in_user(client):
    response = client.get("/accounts/profile/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_an_address_is_saved_cleaned_and_listed_for_its_owner_only(client):
    user, other = UserFactory(), UserFactory()
    AddressFactory(owner=other, city="Paris")
    client.force_login(user)

    response = client.post("/accounts/profile/", {**GOOD, "city": "  London  "})

    assert response.status_code == 302
    address = Address.objects.get(owner=user)
    assert (address.city, address.country, address.postal_code) == ("London", "GB", "SW1Y 4JH")
    page = client.get("/accounts/profile/").content.decode()
    assert "St James" in page and "Paris" not in page


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": " \t "}, "name"),
        ({"line1": ""}, "line1"),
        ({"line1": "x" * 201}, "line1"),
        ({"postal_code": ""}, "postal_code"),
        ({"postal_code": "<script>"}, "postal_code"),
        ({"postal_code": "1" * 21}, "postal_code"),
        ({"city": "c" * 101}, "city"),
        ({"country": "GBR"}, "country"),
        ({"country": "1A"}, "country"),
        ({"country": "ü"}, "country"),
        ({"name": "x" * 10_000}, "name"),
    ],
    ids=str,
)
def test_hostile_addresses_get_the_form_again_with_the_field_named_and_nothing_is_saved(client, fields, field):
    client.force_login(UserFactory())
    response = client.post("/accounts/profile/", {**GOOD, **fields})
    assert response.status_code == 200
    assert field in response.context["form"].errors
    assert not Address.objects.exists()


def test_the_service_refuses_wrong_types_and_unknown_fields():
    user = UserFactory()
    with pytest.raises(services.InvalidAddress) as wrong_type:
        services.add_address(owner=user, **{**GOOD, "city": ["London"]})
    assert wrong_type.value.field == "city"
    with pytest.raises(services.InvalidAddress) as unknown:
        services.add_address(owner=user, **GOOD, is_staff=True)
    assert unknown.value.field == "is_staff"
    assert not Address.objects.exists()


def test_an_account_keeps_at_most_twenty_addresses():
    user = UserFactory()
    AddressFactory.create_batch(services.MAX_ADDRESSES, owner=user)
    with pytest.raises(services.InvalidAddress):
        services.add_address(owner=user, **GOOD)
    assert Address.objects.filter(owner=user).count() == services.MAX_ADDRESSES


def test_an_owner_deletes_their_address_and_no_one_elses(client):
    user, other = UserFactory(), UserFactory()
    mine, theirs = AddressFactory(owner=user), AddressFactory(owner=other)
    client.force_login(user)

    assert client.post(f"/accounts/profile/addresses/{theirs.pk}/delete/").status_code == 404
    assert client.get(f"/accounts/profile/addresses/{mine.pk}/delete/").status_code == 405
    assert client.post(f"/accounts/profile/addresses/{mine.pk}/delete/").status_code == 302

    assert list(Address.objects.all()) == [theirs]
    with pytest.raises(services.UnknownAddress):
        selectors.address_get_for(owner=user, address_id=theirs.pk)
