"""Stock changes by delta only: the stock services, their ledger, and the product admin."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.db import IntegrityError, transaction
from django.db.models import F, Sum
from django.db.models.signals import pre_save
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orders import stock
from orders.models import Order, Product, StockMovement
from tests.concurrency import run_concurrently
from tests.factories import OrderFactory, OrderItemFactory, ProductFactory, StockMovementFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser():
    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def admin_client(client, superuser):
    client.force_login(superuser)
    return client


def order_for(*lines: tuple[Product, int], owner=None) -> Order:
    """A confirmed order with one item per (product, quantity), made directly: no stock is taken."""
    order = OrderFactory(item=None, **({"owner": owner} if owner else {}))
    for product, quantity in lines:
        OrderItemFactory(order=order, product=product, quantity=quantity)
    return order


def product_form(product: Product, **changes) -> dict:
    """The change form's POST data as the page showed it, including a stale `stock` field."""
    data = {"sku": product.sku, "name": product.name, "price": str(product.price), "stock": str(product.stock)}
    data.update(changes)
    return data


def on_hand(product: Product) -> int:
    product.refresh_from_db(fields=["stock"])
    return product.stock


def ledger_total(product: Product) -> int:
    return StockMovement.objects.filter(product=product).aggregate(total=Sum("delta", default=0))["total"]


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# --- The product admin never writes stock from a form -----------------------


def test_a_stale_product_form_does_not_undo_a_reservation(admin_client):
    # Given the product page loaded at stock 10
    product = ProductFactory(stock=10, price=Decimal("10.00"))
    change_url = reverse("admin:orders_product_change", args=[product.pk])
    page = admin_client.get(change_url)
    assert page.status_code == 200
    stale = product_form(product, price="12.50")
    # and an order reserving 4 after that
    assert stock.reserve_for_order(order=order_for((product, 4))) == []

    # When the stale form is saved with a new price and the old stock
    response = admin_client.post(change_url, stale)

    # Then the price changes and the reservation stands
    assert response.status_code == 302
    product.refresh_from_db()
    assert product.price == Decimal("12.50")
    assert product.stock == 6
    assert b'name="stock"' not in page.content


def test_a_product_save_does_not_write_stock_read_before_a_concurrent_reservation(admin_client):
    """The admin reads the row, then a reservation lands before it writes: the write leaves stock alone."""
    product = ProductFactory(stock=10)

    def reserve_just_before_the_write(sender, instance, **kwargs):
        if instance.pk == product.pk:
            Product.objects.filter(pk=product.pk, stock__gte=4).update(stock=F("stock") - 4)

    pre_save.connect(reserve_just_before_the_write, sender=Product)
    try:
        response = admin_client.post(
            reverse("admin:orders_product_change", args=[product.pk]), product_form(product, name="Renamed")
        )
    finally:
        pre_save.disconnect(reserve_just_before_the_write, sender=Product)

    assert response.status_code == 302
    product.refresh_from_db()
    assert (product.name, product.stock) == ("Renamed", 6)


def test_a_new_product_starts_with_no_stock_whatever_the_form_says(admin_client):
    response = admin_client.post(
        reverse("admin:orders_product_add"), {"sku": "NEW-1", "name": "New", "price": "5.00", "stock": "50"}
    )

    assert response.status_code == 302
    assert Product.objects.get(sku="NEW-1").stock == 0
    assert not StockMovement.objects.exists()


def test_the_product_page_links_to_receive_adjust_and_the_movements(admin_client):
    product = ProductFactory()

    response = admin_client.get(reverse("admin:orders_product_change", args=[product.pk]))

    assert reverse("admin:orders_product_receive_stock", args=[product.pk]) in response.text
    assert reverse("admin:orders_product_adjust_stock", args=[product.pk]) in response.text
    assert f"{reverse('admin:orders_stockmovement_changelist')}?product__id__exact={product.pk}" in response.text


# --- Receive and adjust through the admin -----------------------------------


def test_receiving_stock_in_the_admin_adds_units_and_records_who(admin_client, superuser):
    product = ProductFactory(stock=10)
    url = reverse("admin:orders_product_receive_stock", args=[product.pk])
    assert admin_client.get(url).status_code == 200

    response = admin_client.post(url, {"quantity": "5", "reason": "delivery 42"}, follow=True)

    assert response.redirect_chain[-1][0] == reverse("admin:orders_product_change", args=[product.pk])
    assert f"{product.sku}: received +5, stock on hand is now 15." in messages_of(response)
    assert on_hand(product) == 15
    movement = StockMovement.objects.get(product=product)
    assert (movement.kind, movement.delta, movement.reason, movement.created_by) == (
        StockMovement.Kind.RECEIVED,
        5,
        "delivery 42",
        superuser,
    )


def test_adjusting_stock_in_the_admin_applies_the_delta_with_its_reason(admin_client, superuser):
    product = ProductFactory(stock=10)

    response = admin_client.post(
        reverse("admin:orders_product_adjust_stock", args=[product.pk]),
        {"delta": "-3", "reason": "two broken, one lost"},
        follow=True,
    )

    assert f"{product.sku}: adjusted -3, stock on hand is now 7." in messages_of(response)
    assert on_hand(product) == 7
    assert list(StockMovement.objects.values_list("kind", "delta", "reason", "created_by")) == [
        ("adjusted", -3, "two broken, one lost", superuser.pk)
    ]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"delta": "-3", "reason": ""}, "This field is required."),
        ({"delta": "0", "reason": "recount"}, "Enter a change other than zero."),
        ({"delta": "1.5", "reason": "recount"}, "Enter a whole number."),
    ],
)
def test_an_adjustment_needs_a_reason_and_a_whole_non_zero_delta(admin_client, data, error):
    product = ProductFactory(stock=10)

    response = admin_client.post(reverse("admin:orders_product_adjust_stock", args=[product.pk]), data)

    assert response.status_code == 200
    assert error in response.text
    assert on_hand(product) == 10
    assert not StockMovement.objects.exists()


def test_an_adjustment_below_zero_is_refused_with_a_clear_message(admin_client):
    product = ProductFactory(stock=2)

    response = admin_client.post(
        reverse("admin:orders_product_adjust_stock", args=[product.pk]), {"delta": "-5", "reason": "count"}
    )

    assert response.status_code == 200
    assert "Cannot take 5 units: only 2 in stock. Nothing was changed." in response.text
    assert on_hand(product) == 2
    assert not StockMovement.objects.exists()


def test_staff_who_may_only_view_products_cannot_change_stock(client):
    staff = UserFactory(is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename="view_product"))
    client.force_login(staff)
    product = ProductFactory(stock=10)

    response = client.post(reverse("admin:orders_product_receive_stock", args=[product.pk]), {"quantity": "5"})

    assert response.status_code == 403
    assert on_hand(product) == 10


def test_the_stock_movements_admin_lists_a_products_movements_and_changes_nothing(admin_client):
    mug, plate = ProductFactory(), ProductFactory()
    received = StockMovementFactory(product=mug, delta=5)
    StockMovementFactory(product=plate)
    changelist = reverse("admin:orders_stockmovement_changelist")

    response = admin_client.get(changelist, {"product__id__exact": mug.pk})

    assert list(response.context["cl"].result_list) == [received]
    assert admin_client.get(reverse("admin:orders_stockmovement_add")).status_code == 403
    admin_client.post(reverse("admin:orders_stockmovement_change", args=[received.pk]), {"delta": "500"})
    assert admin_client.post(reverse("admin:orders_stockmovement_delete", args=[received.pk])).status_code == 403
    received.refresh_from_db()
    assert received.delta == 5


# --- The services -------------------------------------------------------------


def test_receive_stock_refuses_a_quantity_below_one():
    product = ProductFactory(stock=10)

    for quantity in (0, -1):
        with pytest.raises(stock.InvalidStockChange):
            stock.receive_stock(product_id=product.pk, quantity=quantity)

    assert on_hand(product) == 10
    assert not StockMovement.objects.exists()


def test_adjust_stock_refuses_a_zero_delta_or_an_empty_reason():
    product = ProductFactory(stock=10)

    with pytest.raises(stock.InvalidStockChange):
        stock.adjust_stock(product_id=product.pk, delta=0, reason="recount")
    with pytest.raises(stock.InvalidStockChange):
        stock.adjust_stock(product_id=product.pk, delta=2, reason="  ")

    assert on_hand(product) == 10


def test_adjust_stock_below_zero_raises_insufficient_stock_and_records_nothing():
    product = ProductFactory(stock=3)

    with pytest.raises(stock.InsufficientStock) as refused:
        stock.adjust_stock(product_id=product.pk, delta=-4, reason="count")

    assert (refused.value.on_hand, refused.value.delta) == (3, -4)
    assert on_hand(product) == 3
    assert not StockMovement.objects.exists()


def test_adjust_stock_may_take_the_last_unit():
    product = ProductFactory(stock=3)

    stock.adjust_stock(product_id=product.pk, delta=-3, reason="count")

    assert on_hand(product) == 0


def test_reserve_for_order_takes_every_item_and_records_one_movement_each():
    mug, plate = ProductFactory(stock=10), ProductFactory(stock=10)
    order = order_for((plate, 2), (mug, 3))

    short = stock.reserve_for_order(order=order)

    assert short == []
    assert (on_hand(mug), on_hand(plate)) == (7, 8)
    assert sorted(order.stock_movements.values_list("product_id", "kind", "delta")) == sorted(
        [(mug.pk, "reserved", -3), (plate.pk, "reserved", -2)]
    )


def test_reserve_for_order_takes_nothing_when_an_item_is_short():
    mug, plate = ProductFactory(stock=10), ProductFactory(sku="PLATE", stock=1)
    order = order_for((mug, 3), (plate, 2))

    short = stock.reserve_for_order(order=order)

    assert short == ["PLATE"]
    assert (on_hand(mug), on_hand(plate)) == (10, 1)
    assert not StockMovement.objects.exists()


def test_release_for_order_gives_back_what_the_order_reserved_once():
    mug, plate = ProductFactory(stock=10), ProductFactory(stock=10)
    order = order_for((mug, 3), (plate, 2))
    stock.reserve_for_order(order=order)

    stock.release_for_order(order=order)
    stock.release_for_order(order=order)

    assert (on_hand(mug), on_hand(plate)) == (10, 10)
    assert sorted(order.stock_movements.filter(kind="released").values_list("product_id", "delta")) == sorted(
        [(mug.pk, 3), (plate.pk, 2)]
    )


def test_release_for_order_gives_nothing_for_an_order_that_reserved_nothing():
    product = ProductFactory(sku="SHORT", stock=1)
    order = order_for((product, 2))
    assert stock.reserve_for_order(order=order) == ["SHORT"]

    stock.release_for_order(order=order)

    assert on_hand(product) == 1
    assert not StockMovement.objects.exists()


@pytest.mark.parametrize(("kind", "delta"), [("received", 0), ("received", -1), ("reserved", 2), ("released", -2)])
def test_a_movement_delta_is_non_zero_and_signed_by_its_kind(kind, delta):
    with pytest.raises(IntegrityError), transaction.atomic():
        StockMovementFactory(kind=kind, delta=delta)


# --- Concurrency and the ledger invariant --------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("adjustment", [3, -2])
def test_concurrent_reservations_and_an_adjustment_account_for_every_unit(adjustment):
    # Given stock 5, eight one-unit orders and a stock count, all released together
    product = ProductFactory(sku="LAST-FIVE", stock=5)
    owner = UserFactory()
    orders = [order_for((product, 1), owner=owner) for _ in range(8)]

    def work(i: int):
        if i == len(orders):
            try:
                return stock.adjust_stock(product_id=product.pk, delta=adjustment, reason="count")
            except stock.InsufficientStock:
                return None
        with transaction.atomic():
            order = Order.objects.select_for_update().get(pk=orders[i].pk)
            return stock.reserve_for_order(order=order)

    # When they run at once, each on its own connection
    *reservations, adjusted = run_concurrently(len(orders) + 1, work)

    # Then every unit is on hand, reserved, or adjusted away, and none is counted twice
    reserved = reservations.count([])
    assert reservations.count(["LAST-FIVE"]) == len(orders) - reserved
    applied = adjustment if adjusted is not None else 0
    assert on_hand(product) >= 0
    assert on_hand(product) + reserved == 5 + applied
    assert StockMovement.objects.filter(kind="reserved").count() == reserved
    assert on_hand(product) == 5 + ledger_total(product)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), st.integers(1, 20)),
        st.tuples(st.just("adjust"), st.integers(-20, 20).filter(bool)),
        st.tuples(st.just("reserve"), st.integers(1, 20)),
        st.tuples(st.just("release"), st.integers(0, 50)),
    ),
    max_size=25,
)


@pytest.mark.fuzz  # 60 runs of stock moves on PostgreSQL, about 2.5 s: out of the unit tier
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.integers(0, 30), steps=operations)
def test_stock_on_hand_is_the_initial_stock_plus_the_ledger(initial, steps):
    with transaction.atomic():
        product = ProductFactory(stock=initial)
        owner = UserFactory()
        expected = initial
        orders: list[tuple[Order, int]] = []
        released: set[int] = set()
        for operation, amount in steps:
            if operation == "receive":
                stock.receive_stock(product_id=product.pk, quantity=amount)
                expected += amount
            elif operation == "adjust":
                if expected + amount < 0:
                    with pytest.raises(stock.InsufficientStock):
                        stock.adjust_stock(product_id=product.pk, delta=amount, reason="count")
                else:
                    stock.adjust_stock(product_id=product.pk, delta=amount, reason="count")
                    expected += amount
            elif operation == "reserve":
                order = order_for((product, amount), owner=owner)
                short = stock.reserve_for_order(order=order)
                assert short == ([] if amount <= expected else [product.sku])
                if not short:
                    expected -= amount
                    orders.append((order, amount))
            elif orders:
                # Picks any reserved order, so releasing one twice is exercised too.
                order, amount = orders[amount % len(orders)]
                stock.release_for_order(order=order)
                if order.pk not in released:
                    expected += amount
                    released.add(order.pk)
            assert on_hand(product) == expected >= 0
            assert on_hand(product) == initial + ledger_total(product)
        transaction.set_rollback(True)
