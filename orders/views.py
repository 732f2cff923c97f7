import uuid
from datetime import timedelta
from typing import cast

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import selectors as account_selectors
from accounts import services as account_services
from core.types import AuthenticatedHttpRequest
from integrations.errors import ProviderRejected, ProviderUnavailable
from payments import selectors as payment_selectors
from payments import services as payment_services
from payments.models import Payment, PaymentMethod, Refund

from . import selectors, services
from .cart import SKU_MAX_LENGTH, Cart, CartRefused, CartSummary, cart_for
from .forms import (
    TEST_CARDS,
    CartAddForm,
    CartRemoveForm,
    CartSetForm,
    CatalogueSearchForm,
    CheckoutForm,
    OrderForm,
    PlaceOrderForm,
)
from .models import Order

PRODUCTS_PER_PAGE = 24


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """The catalogue: every product, or those whose name or sku holds the search, a page at a time."""
    form = CatalogueSearchForm(request.GET)
    search = form.cleaned_data["q"].strip() if form.is_valid() else ""
    page = Paginator(selectors.product_list(search=search), PRODUCTS_PER_PAGE).get_page(request.GET.get("page"))
    context = {"form": form, "search": search, "page": page, "in_cart": cart_for(request).quantities}
    return render(request, "orders/home.html", context, status=200 if form.is_valid() else 400)


@require_GET
def product_detail(request: HttpRequest) -> HttpResponse:
    """One product by its sku (`?sku=`): a query, not a path, since the product is everyone's, not an owned object."""
    sku = request.GET.get("sku", "")
    product = selectors.product_get(sku=sku) if 0 < len(sku) <= SKU_MAX_LENGTH else None
    if product is None:
        raise Http404("no such product")
    context = {
        "product": product,
        "paragraphs": [part.strip() for part in product.description.split("\n\n") if part.strip()],
        "in_cart": cart_for(request).quantities.get(product.sku, 0),
        "form": CartAddForm(initial={"sku": product.sku, "quantity": 1}),
    }
    return render(request, "orders/product_detail.html", context)


# --- Cart -----------------------------------------------------------------------------------

# An order that ended without being paid gives its lines back to the cart; a paid one lets them go (also when its
# shopper cancels it after paying: a choice made, not a failure to undo).
UNPAID_ENDINGS = (Order.Status.PAYMENT_FAILED, Order.Status.REJECTED, Order.Status.CANCELLED, Order.Status.EXPIRED)
HELD_KEY = "cart_held_for_order"


def _hold_cart(request: HttpRequest, cart: Cart, order: Order) -> None:
    """Empty the cart once its order is placed, keeping a copy until the order is paid (a decline gives it back)."""
    request.session[HELD_KEY] = {"order": order.pk, "lines": cart.quantities}
    cart.clear()


def _held_order_id(request: HttpRequest) -> int | None:
    held = request.session.get(HELD_KEY)
    order_id = held.get("order") if isinstance(held, dict) else None
    return order_id if type(order_id) is int else None


def _take_back_unpaid(request: HttpRequest, cart: Cart) -> None:
    """The cart of an order that ended unpaid (a declined card) comes back; a paid order's copy is dropped."""
    held = request.session.get(HELD_KEY)
    order_id = _held_order_id(request)
    if held is None:
        return
    if order_id is None or not request.user.is_authenticated:
        request.session.pop(HELD_KEY, None)
        return
    status = selectors.order_status_for(owner=request.user, order_id=order_id)
    if status in (Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.ON_HOLD):
        return  # still on its way to being paid
    request.session.pop(HELD_KEY, None)
    unpaid = status in UNPAID_ENDINGS and not selectors.order_was_charged(owner=request.user, order_id=order_id)
    if unpaid and isinstance(held.get("lines"), dict):
        for note in cart.merge(held["lines"], add_up=False):
            messages.warning(request, note)
        messages.info(request, f"Order #{order_id} was not paid, so its items are back in your cart.")


def _cart_page(request: HttpRequest, cart: Cart, *, status: int = 200) -> HttpResponse:
    summary: CartSummary = cart.summary()
    return render(request, "orders/cart.html", {"cart": summary}, status=status)


def _refused(request: HttpRequest, cart: Cart, message: str) -> HttpResponse:
    """A cart change the rules or the form refused: the cart again, unchanged, with the reason; never a 5xx."""
    messages.error(request, message)
    return _cart_page(request, cart, status=400)


def _first_error(form: CartAddForm | CartSetForm | CartRemoveForm) -> str:
    if "sku" in form.errors:
        return "Choose a product from the catalogue."
    return str(next(iter(form.errors.get("quantity") or form.non_field_errors() or ["That change was refused."])))


@require_GET
def cart_detail(request: HttpRequest) -> HttpResponse:
    cart = cart_for(request)
    _take_back_unpaid(request, cart)
    return _cart_page(request, cart)


@require_POST
def cart_add(request: HttpRequest) -> HttpResponse:
    cart = cart_for(request)
    form = CartAddForm(request.POST)
    if not form.is_valid():
        return _refused(request, cart, _first_error(form))
    try:
        product = cart.add(sku=form.cleaned_data["sku"], quantity=form.cleaned_data["quantity"])
    except CartRefused as exc:
        return _refused(request, cart, str(exc))
    messages.success(request, f"Added {form.cleaned_data['quantity']} × {product.name} to your cart.")
    return redirect("orders:cart")


@require_POST
def cart_set(request: HttpRequest) -> HttpResponse:
    cart = cart_for(request)
    form = CartSetForm(request.POST)
    if not form.is_valid():
        return _refused(request, cart, _first_error(form))
    try:
        product = cart.set(sku=form.cleaned_data["sku"], quantity=form.cleaned_data["quantity"])
    except CartRefused as exc:
        return _refused(request, cart, str(exc))
    if product is None:
        messages.success(request, "Removed from your cart.")
    else:
        messages.success(request, f"{product.name}: quantity changed to {form.cleaned_data['quantity']}.")
    return redirect("orders:cart")


@require_POST
def cart_remove(request: HttpRequest) -> HttpResponse:
    cart = cart_for(request)
    form = CartRemoveForm(request.POST)
    if not form.is_valid():
        return _refused(request, cart, _first_error(form))
    try:
        cart.remove(sku=form.cleaned_data["sku"])
    except CartRefused as exc:
        return _refused(request, cart, str(exc))
    messages.success(request, "Removed from your cart.")
    return redirect("orders:cart")


# --- Checkout -------------------------------------------------------------------------------


def _checkout_blocked(request: HttpRequest, summary: CartSummary) -> HttpResponse | None:
    """Back to the cart when it cannot be placed as it is: empty, or a line the catalogue no longer covers."""
    if not summary.lines:
        messages.info(request, "Your cart is empty: add a product before you check out.")
        return redirect("orders:cart")
    if summary.problems:
        messages.error(request, "Some lines of your cart cannot be ordered as they are: fix them to check out.")
        return redirect("orders:cart")
    return None


def _checkout_page(
    request: AuthenticatedHttpRequest, form: CheckoutForm, summary: CartSummary, *, status: int = 200
) -> HttpResponse:
    if form.is_bound:
        # A card number or CVC is never sent back in a page: the shopper types it again.
        data = cast(QueryDict, form.data).copy()
        data.pop("card_number", None)
        data.pop("cvc", None)
        form.data = data
    context = {
        "form": form,
        "cart": summary,
        "addresses": account_selectors.addresses_for(owner=request.user),
        "cards": payment_selectors.payment_methods_for(owner=request.user),
        "test_cards": TEST_CARDS if settings.DEBUG else [],
    }
    return render(request, "orders/checkout.html", context, status=status)


def _new_card(request: AuthenticatedHttpRequest, form: CheckoutForm) -> PaymentMethod | None:
    """The new card, tokenised at the provider and saved; None with the refusal on the form's field."""
    try:
        return payment_services.add_card(
            owner=request.user,
            number=form.cleaned_data["card_number"],
            exp_month=form.cleaned_data["exp_month"],
            exp_year=form.cleaned_data["exp_year"],
            cvc=form.cleaned_data["cvc"],
        )
    except payment_services.CardRefused as exc:
        form.add_error(exc.field if exc.field in form.fields else "card_number", str(exc))
    except ProviderUnavailable:
        form.add_error(None, "The card could not be checked just now: nothing was charged. Try again in a moment.")
    except ProviderRejected:
        # The provider refused the request itself, not the card: nothing the shopper can fix in the form.
        form.add_error(None, "The card could not be added just now: nothing was charged. Try another card or later.")
    return None


def _owned_card(request: AuthenticatedHttpRequest, payment_method_id: int) -> PaymentMethod:
    try:
        return payment_selectors.payment_method_get_for(owner=request.user, payment_method_id=payment_method_id)
    except payment_services.UnknownPaymentMethod:
        raise Http404("no such card") from None


def _owned_address(request: AuthenticatedHttpRequest, address_id: int) -> dict[str, str]:
    try:
        return account_selectors.address_get_for(owner=request.user, address_id=address_id).snapshot()
    except account_services.UnknownAddress:
        raise Http404("no such address") from None


def _new_address(form: CheckoutForm) -> dict[str, str] | None:
    """The new address's fields as the service cleans them, or None with the field's error on the form."""
    try:
        return account_services.clean_address(form.new_address())
    except account_services.InvalidAddress as exc:
        form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        return None


@sensitive_post_parameters("card_number", "cvc")
@login_required
@require_http_methods(["GET", "POST"])
def checkout(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Address and card; a valid choice shows the review, whose button places the order."""
    cart = cart_for(request)
    _take_back_unpaid(request, cart)
    summary = cart.summary()
    blocked = _checkout_blocked(request, summary)
    if blocked is not None:
        return blocked
    if request.method == "GET":
        addresses = account_selectors.addresses_for(owner=request.user).values_list("pk", flat=True)[:1]
        cards = payment_selectors.payment_methods_for(owner=request.user).values_list("pk", flat=True)[:1]
        initial = {
            "idempotency_key": uuid.uuid4().hex,
            "address": next(iter(addresses), "new"),
            "card": next(iter(cards), "new"),
        }
        return _checkout_page(request, CheckoutForm(initial=initial), summary)
    form = CheckoutForm(request.POST)
    if not form.is_valid():
        if form.has_error("idempotency_key"):
            data = cast(QueryDict, form.data).copy()
            data["idempotency_key"] = uuid.uuid4().hex
            form.data = data
        return _checkout_page(request, form, summary, status=400)
    # Every choice is checked before anything is kept: a saved id of someone else's is a 404 here.
    address_id = form.cleaned_data["address"]
    address = _owned_address(request, address_id) if address_id is not None else _new_address(form)
    card = _owned_card(request, form.cleaned_data["card"]) if form.cleaned_data["card"] is not None else None
    if address is None:
        return _checkout_page(request, form, summary, status=400)
    card = card or _new_card(request, form)
    if card is None:
        return _checkout_page(request, form, summary, status=400)
    if address_id is None and form.cleaned_data["save_address"]:
        try:
            address_id = account_services.add_address(owner=request.user, **address).pk
        except account_services.InvalidAddress as exc:
            # The card is kept (a saved card now); the shopper chooses it next time.
            form.add_error("address", str(exc))
            return _checkout_page(request, form, summary, status=400)
    place = PlaceOrderForm(
        initial={
            "idempotency_key": form.cleaned_data["idempotency_key"],
            "address_id": address_id,
            "payment_method_id": card.pk,
            "cart_digest": cart.digest(),
            **({} if address_id is not None else address),
        }
    )
    context = {"cart": summary, "address": address, "card": card, "form": place}
    return render(request, "orders/checkout_review.html", context)


@login_required
@require_POST
def checkout_place(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Place the reviewed cart through orders.services.place_order: the same key places one order, once."""
    form = PlaceOrderForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The checkout could not be read: check out again.")
        return redirect("orders:checkout")
    placed = selectors.order_get_by_key(owner=request.user, idempotency_key=form.cleaned_data["idempotency_key"])
    if placed is not None:
        # A second click of the same button: the order it placed is the answer.
        return redirect("orders:detail", order_id=placed.pk)
    address_id = form.cleaned_data["address_id"]
    address: dict[str, object] = (
        dict(_owned_address(request, address_id)) if address_id is not None else form.new_address()
    )
    card = _owned_card(request, form.cleaned_data["payment_method_id"])
    cart = cart_for(request)
    blocked = _checkout_blocked(request, cart.summary())
    if blocked is not None:
        return blocked
    if form.cleaned_data["cart_digest"] != cart.digest():
        messages.error(request, "Your cart changed after you reviewed it: review it again before you place it.")
        return redirect("orders:checkout")
    try:
        order = services.place_order(
            owner=request.user,
            items=cart.items(),
            idempotency_key=form.cleaned_data["idempotency_key"],
            payment_method_id=card.pk,
            shipping_address=address,
        )
    except services.IdempotencyKeyReused:
        messages.error(request, "Your cart changed after you reviewed it: review it again before you place it.")
        return redirect("orders:checkout")
    except account_services.InvalidAddress as exc:
        messages.error(request, f"The address was refused: {exc}")
        return redirect("orders:checkout")
    except services.OrderError as exc:
        messages.error(request, str(exc))
        return redirect("orders:cart")
    _hold_cart(request, cart, order)
    messages.success(request, f"Order #{order.pk} placed. This page follows it as it goes.")
    return redirect("orders:detail", order_id=order.pk)


@login_required
def order_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    orders = selectors.order_list_for(owner=request.user, prefetch=("items",))[:100]
    return render(request, "orders/order_list.html", {"orders": orders})


@login_required
def order_new(request: AuthenticatedHttpRequest) -> HttpResponse:
    products = list(selectors.product_list())
    if request.method == "POST":
        form = OrderForm(request.POST, products=products)
        if form.is_valid():
            try:
                order = services.place_order(
                    owner=request.user,
                    items=form.cleaned_data["items"],
                    idempotency_key=form.cleaned_data["idempotency_key"],
                )
            except services.OrderError as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(request, f"Order #{order.pk} placed.")
                return redirect("orders:detail", order_id=order.pk)
        if form.has_error("idempotency_key"):
            # The posted key can never pass; a fresh one lets the shopper submit the form again.
            data = cast(QueryDict, form.data).copy()  # a bound form's data is the request's QueryDict
            data["idempotency_key"] = uuid.uuid4().hex
            form.data = data
        status = 400
    else:
        form = OrderForm(initial={"idempotency_key": uuid.uuid4().hex}, products=products)
        status = 200
    return render(request, "orders/order_new.html", {"form": form}, status=status)


# A step still running after this long gets a "taking longer than usual" line instead of a bare spinner.
SLOW_AFTER = timedelta(seconds=60)
BUSY = (Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.PAID)


def _sold_out(order: Order) -> str:
    """The names of the lines a rejection found short, from its event's note ("out of stock: SKU, ...")."""
    note = next((event.note for event in order.events.all() if event.to_status == Order.Status.REJECTED), "")
    skus = set(note.partition(": ")[2].split(", "))
    return ", ".join(item.name for item in order.items.all() if item.sku in skus)


def page_state(order: Order, payment: Payment | None) -> str:
    """Which of the page's messages the order shows: its status, but a cancelled order that was paid (its money
    is being given back) has its own. static/js/order_status.js (`stateOf`) decides the same from the API."""
    if order.status == Order.Status.CANCELLED and payment is not None and payment.status == Payment.Status.SUCCEEDED:
        return "cancelled_paid"
    return order.status


@login_required
def order_detail(request: AuthenticatedHttpRequest, order_id: int) -> HttpResponse:
    order = selectors.order_get_for(owner=request.user, order_id=order_id)
    if order is None:
        raise Http404("no such order")
    payment = order.payment
    refunds = selectors.order_refunds(order)
    refunding = any(refund.status == Refund.Status.REQUESTED for refund in refunds)
    context = {
        "order": order,
        "payment": payment,
        "refunds": refunds,
        "state": page_state(order, payment),
        # The last refund failed: nothing was given back by it, and staff have been told.
        "refund_failed": bool(refunds) and refunds[-1].status == Refund.Status.FAILED,
        "sold_out": _sold_out(order) if order.status == Order.Status.REJECTED else "",
        # Work still under way: the page shows a spinner and follows the order until it is done.
        "busy": order.status in BUSY or refunding,
        "watching": not order.is_terminal or refunding,
        "slow": order.status in BUSY and timezone.now() - order.updated_at > SLOW_AFTER,
        "slow_after_seconds": int(SLOW_AFTER.total_seconds()),
        "expiry_minutes": f"{settings.PAYMENT_EXPIRY_SECONDS / 60:g}",
        # Its cart was emptied when it was placed and comes back if it ends unpaid (a declined card).
        "cart_kept": _held_order_id(request) == order.pk,
    }
    return render(request, "orders/order_detail.html", context)


@login_required
@require_POST
def order_cancel(request: AuthenticatedHttpRequest, order_id: int) -> HttpResponse:
    try:
        order = services.cancel_order(order_id=order_id, owner=request.user)
    except Order.DoesNotExist:
        raise Http404("no such order") from None
    except services.OrderNotCancellable as exc:
        messages.error(request, str(exc))
    else:
        refunds = selectors.order_refunds(order)
        if page_state(order, order.payment) == "cancelled_paid" and refunds:
            messages.success(
                request,
                f"Order #{order_id} cancelled. €{refunds[-1].amount} is being refunded to your card: "
                "this page shows when the refund has gone through.",
            )
        else:
            messages.success(request, f"Order #{order_id} cancelled.")
    return redirect("orders:detail", order_id=order_id)
