from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import models
from django.db.models import Q

if TYPE_CHECKING:
    from payments.models import Payment


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    # What the product page says about it: plain text, paragraphs separated by blank lines.
    description = models.TextField(blank=True, default="")
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(stock__gte=0), name="product_stock_non_negative"),
            models.CheckConstraint(condition=Q(price__gte=0), name="product_price_non_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class Order(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        CONFIRMED = "confirmed"
        PAID = "paid"
        FULFILLED = "fulfilled"
        REJECTED = "rejected"
        PAYMENT_FAILED = "payment_failed"
        CANCELLED = "cancelled"
        # A step could not finish by itself: the shopper sees a plain message, staff resolve it in the admin.
        ON_HOLD = "on_hold"
        # Confirmed, but not paid within its reservation time (PAYMENT_EXPIRY_SECONDS): stock released.
        EXPIRED = "expired"
        # Money given back: all of the charge, or part of it (after a line or an amount was refunded).
        REFUNDED = "refunded"
        PARTIALLY_REFUNDED = "partially_refunded"

    CANCELLABLE = (Status.PENDING, Status.CONFIRMED)
    TERMINAL = (
        Status.FULFILLED,
        Status.REJECTED,
        Status.PAYMENT_FAILED,
        Status.CANCELLED,
        Status.EXPIRED,
        Status.REFUNDED,
        Status.PARTIALLY_REFUNDED,
    )

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    total = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0.00"))
    currency = models.CharField(max_length=3, default="EUR")
    idempotency_key = models.CharField(max_length=64, blank=True, default="")
    # Why the order is on hold, in words staff and the shopper can read; empty otherwise.
    hold_reason = models.CharField(max_length=255, blank=True, default="")
    # The warehouse's idempotency key for this order's shipment: random, made once when it is first
    # handed over, so it is unique across databases and deployments sharing one warehouse account.
    fulfillment_key = models.CharField(max_length=64, blank=True, default="")
    # The card the order is charged to (one of the owner's; none for orders placed without one).
    payment_method = models.ForeignKey(
        "payments.PaymentMethod", on_delete=models.PROTECT, null=True, blank=True, related_name="orders"
    )
    # Where it ships, copied when it is placed (later edits of a saved address do not move it).
    shipping_address = models.JSONField(default=dict, blank=True)
    # The flat shipping fee charged with it (SHIPPING_FEE when it ships to an address), part of `total`.
    shipping_fee = models.DecimalField(max_digits=10, decimal_places=2, default=Decimal("0.00"))
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="order_idempotency_key_unique_per_owner",
            ),
            models.CheckConstraint(condition=Q(total__gte=0), name="order_total_non_negative"),
        ]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"Order #{self.pk} ({self.status})"

    @property
    def can_cancel(self) -> bool:
        """Before payment, or paid and not yet handed to the warehouse (then refunded in full); also on hold when
        it was held on its way from one of those: before its stock was reserved, or paid before the hand-over.

        Held on its way to payment it is not: the charge needs staff first (`orders.services.cancel_order`).
        """
        if self.status in self.CANCELLABLE:
            return True
        status = self.held_from if self.status == self.Status.ON_HOLD else self.status
        return status == self.Status.PENDING or (status == self.Status.PAID and not self.fulfillment_key)

    @property
    def held_from(self) -> str | None:
        """The status an order on hold left when it was held (None when it is not on hold), from its prefetched
        events when they are loaded. By id, not time: events are written by processes whose clocks may differ."""
        if self.status != self.Status.ON_HOLD:
            return None
        events = getattr(self, "_prefetched_objects_cache", {}).get("events")
        if events is None:
            return (
                self.events.filter(to_status=self.Status.ON_HOLD)
                .order_by("-id")
                .values_list("from_status", flat=True)
                .first()
            )
        holds = [event for event in events if event.to_status == self.Status.ON_HOLD]
        return max(holds, key=lambda event: event.pk).from_status if holds else None

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def payment(self) -> "Payment | None":
        """The order's charge once claimed (one per order), from prefetched `payments` when loaded."""
        return next(iter(self.payments.all()), None)


class OrderItem(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    # Copied at order time: later price or name changes do not rewrite history.
    sku = models.CharField(max_length=64)
    name = models.CharField(max_length=200)
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)
    quantity = models.PositiveIntegerField()
    # Units of this line refunded (payments.Refund.lines); those refunded before hand-over are not shipped.
    refunded_quantity = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gt=0), name="orderitem_quantity_positive"),
            models.CheckConstraint(
                condition=Q(refunded_quantity__lte=models.F("quantity")), name="orderitem_refunded_at_most_quantity"
            ),
            models.UniqueConstraint(fields=["order", "product"], name="orderitem_product_once_per_order"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku}"

    @property
    def line_total(self) -> Decimal:
        return self.unit_price * self.quantity

    @property
    def quantity_to_ship(self) -> int:
        return self.quantity - self.refunded_quantity


class OrderEvent(models.Model):
    """Audit row: one per status change."""

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=20, blank=True, default="")
    to_status = models.CharField(max_length=20)
    note = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.order_id}: {self.from_status or '-'} -> {self.to_status}"


class StockMovement(models.Model):
    """Ledger row: one per change of a product's stock on hand, written by orders.stock only."""

    class Kind(models.TextChoices):
        RECEIVED = "received"
        ADJUSTED = "adjusted"
        RESERVED = "reserved"
        RELEASED = "released"

    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="stock_movements")
    # Units added to (positive) or taken from (negative) the stock on hand.
    delta = models.IntegerField()
    kind = models.CharField(max_length=20, choices=Kind.choices)
    reason = models.CharField(max_length=255, blank=True, default="")
    order = models.ForeignKey(Order, on_delete=models.PROTECT, null=True, blank=True, related_name="stock_movements")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # The one-time token of the staff form that made it: the same form posted twice books it once.
    submission = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["submission"], condition=~Q(submission=""), name="stockmovement_submission_once"
            ),
            models.CheckConstraint(condition=~Q(delta=0), name="stockmovement_delta_non_zero"),
            models.CheckConstraint(
                condition=Q(kind="adjusted")
                | Q(kind__in=["received", "released"], delta__gt=0)
                | Q(kind="reserved", delta__lt=0),
                name="stockmovement_delta_sign_matches_kind",
            ),
        ]
        indexes = [models.Index(fields=["product", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.delta:+d} (product {self.product_id})"


class SavedCart(models.Model):
    """A signed-in shopper's cart, kept with the account: {sku: quantity}, as the session holds it (orders/cart.py).

    Written on every change of a signed-in shopper's cart; at sign-in it is read back and the
    visitor's cart is added to it, so a cart follows its shopper from one device to another.
    """

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="saved_cart")
    quantities = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"cart of {self.owner} ({len(self.quantities)} products)"
