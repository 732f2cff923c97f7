from datetime import date
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from . import billing


class Plan(models.Model):
    class Interval(models.TextChoices):
        MONTH = "month"
        YEAR = "year"

    code = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    interval = models.CharField(max_length=10, choices=Interval.choices, default=Interval.MONTH)
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["price"]
        constraints = [models.CheckConstraint(condition=Q(price__gt=0), name="plan_price_positive")]

    def __str__(self) -> str:
        return f"{self.name} ({self.price} {self.currency}/{self.interval})"

    def period_after(self, start: date, *, anchor: date | None = None) -> date:
        """The first day of the period that follows one starting on `start`, on the schedule of `anchor`."""
        return billing.next_period_start(anchor or start, self.interval, start)


class PaymentMethod(models.Model):
    """A card tokenised at the provider: the shop keeps its token, brand, last four digits and expiry, never its number.

    Removing one hides it from its owner (`removed_at`); the orders and payments made with it keep it.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="payment_methods")
    provider_token = models.CharField(max_length=100, unique=True)
    brand = models.CharField(max_length=20)
    last4 = models.CharField(max_length=4)
    exp_month = models.PositiveSmallIntegerField()
    exp_year = models.PositiveSmallIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "removed_at"])]

    def __str__(self) -> str:
        return f"{self.brand.title()} ending in {self.last4} ({self.exp_month:02d}/{self.exp_year})"


class Subscription(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        PAST_DUE = "past_due"
        CANCELLED = "cancelled"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="subscriptions")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    # The period being billed starts on current_period_start; the next one is due on current_period_end.
    current_period_start = models.DateField()
    current_period_end = models.DateField()
    # The first period's start: monthly periods fall on its day of the month (or the month's last day).
    billing_anchor = models.DateField(null=True, blank=True)
    # The card every period is charged to (none: charged without one, as before cards were kept).
    payment_method = models.ForeignKey(
        PaymentMethod, on_delete=models.PROTECT, null=True, blank=True, related_name="subscriptions"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    # Dunning (payments/dunning.py): how many times the due period's charge was declined, and when it
    # is tried again (None: not waiting for a retry). Both are cleared when a period is paid.
    failed_attempts = models.PositiveSmallIntegerField(default=0)
    next_retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "current_period_end"]),
            models.Index(fields=["status", "next_retry_at"]),
        ]
        constraints = [
            # One live subscription per owner and plan: a double-submitted form cannot start two.
            models.UniqueConstraint(
                fields=["owner", "plan"],
                condition=~Q(status="cancelled"),
                name="subscription_live_once_per_owner_plan",
            ),
        ]

    def __str__(self) -> str:
        return f"Subscription #{self.pk} {self.plan.code} ({self.status})"

    @property
    def can_cancel(self) -> bool:
        return self.status != self.Status.CANCELLED

    @property
    def retries_on_card_change(self) -> bool:
        """Past due after a declined try: a new card is tried at once (payments/dunning.py).

        Not after a charge that failed without a decline (needs attention): it may have been taken.
        """
        return self.status == self.Status.PAST_DUE and self.failed_attempts >= 1


class Payment(models.Model):
    class Status(models.TextChoices):
        PROCESSING = "processing"
        SUCCEEDED = "succeeded"
        DECLINED = "declined"
        # The provider gave an answer that cannot be recorded as an outcome (a permanent error, or a
        # charge whose amount, currency or reference does not match): staff decide.
        NEEDS_ATTENTION = "needs_attention"
        # Claimed, then its subscription was cancelled before the charge finished: never sent again.
        VOIDED = "voided"

    FINAL = (Status.SUCCEEDED, Status.DECLINED, Status.NEEDS_ATTENTION, Status.VOIDED)

    order = models.ForeignKey("orders.Order", on_delete=models.PROTECT, null=True, blank=True, related_name="payments")
    subscription = models.ForeignKey(
        Subscription, on_delete=models.PROTECT, null=True, blank=True, related_name="payments"
    )
    billing_period = models.CharField(max_length=10, blank=True, default="")
    # A subscription period's charge is tried again after a decline (dunning): each try is its own
    # payment, with its own idempotency key, numbered from 1. Orders have one payment, attempt 1.
    attempt = models.PositiveSmallIntegerField(default=1)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PROCESSING)
    idempotency_key = models.CharField(max_length=100, unique=True)
    provider_charge_id = models.CharField(max_length=100, blank=True, default="")
    failure_reason = models.CharField(max_length=200, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    # The card charged, fixed when the payment is claimed: every retry charges the same one.
    payment_method = models.ForeignKey(
        PaymentMethod, on_delete=models.PROTECT, null=True, blank=True, related_name="payments"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["subscription", "billing_period", "attempt"],
                condition=Q(subscription__isnull=False),
                name="payment_once_per_subscription_period_attempt",
            ),
            models.CheckConstraint(condition=Q(attempt__gte=1), name="payment_attempt_from_one"),
            models.UniqueConstraint(fields=["order"], condition=Q(order__isnull=False), name="payment_once_per_order"),
            models.CheckConstraint(
                condition=(Q(order__isnull=False) & Q(subscription__isnull=True))
                | (Q(order__isnull=True) & Q(subscription__isnull=False)),
                name="payment_for_order_xor_subscription",
            ),
            models.CheckConstraint(condition=Q(amount__gt=Decimal("0")), name="payment_amount_positive"),
        ]

    def __str__(self) -> str:
        return f"Payment {self.idempotency_key} ({self.status})"


class Refund(models.Model):
    """Money given back on a succeeded payment: claimed here first, then asked of the provider under its own key.

    claim -> call -> record, as charges are (payments/refunds.py). The refunds of a payment that
    are not `failed` never add up to more than its amount: decided under the payment's row lock.
    """

    class Status(models.TextChoices):
        # Claimed: the provider is asked (again, with the same key) until it answers.
        REQUESTED = "requested"
        SUCCEEDED = "succeeded"
        # The provider refused it (nothing was given back): staff look, the amount is refundable again.
        FAILED = "failed"

    FINAL = (Status.SUCCEEDED, Status.FAILED)

    class Reason(models.TextChoices):
        STAFF = "staff"
        CANCELLED_BY_SHOPPER = "cancelled_by_shopper"
        # A charge succeeded after its order had expired (or was cancelled): given back by itself.
        PAID_AFTER_EXPIRY = "paid_after_expiry"

    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="refunds")
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.REQUESTED)
    reason = models.CharField(max_length=30, choices=Reason.choices, default=Reason.STAFF)
    note = models.CharField(max_length=255, blank=True, default="")
    # The order lines it gives back, {"<order item id>": quantity}; empty for a refund of an amount.
    lines = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=100, unique=True)
    provider_refund_id = models.CharField(max_length=100, blank=True, default="")
    failure_reason = models.CharField(max_length=200, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # The one-time token of the form or the client's Idempotency-Key: the same request refunds once.
    submission = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=Decimal("0")), name="refund_amount_positive"),
            models.UniqueConstraint(
                fields=["payment", "submission"], condition=~Q(submission=""), name="refund_submission_once"
            ),
        ]

    def __str__(self) -> str:
        return f"Refund {self.amount} {self.currency} of payment {self.payment_id} ({self.status})"


class WebhookEvent(models.Model):
    """A provider event, stored once by its provider id."""

    class Status(models.TextChoices):
        RECEIVED = "received"
        PROCESSED = "processed"
        INVALID = "invalid"

    provider_event_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RECEIVED)
    error = models.CharField(max_length=500, blank=True, default="")
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at", "-id"]

    def __str__(self) -> str:
        return f"{self.provider_event_id} {self.type}"


class PaymentMismatch(models.Model):
    """A disagreement between the shop's payments and the provider's ledger, found by payments/reconciliation.py."""

    class Kind(models.TextChoices):
        PROVIDER_CHARGE_WITHOUT_PAYMENT = "provider_charge_without_payment"
        PAYMENT_WITHOUT_PROVIDER_CHARGE = "payment_without_provider_charge"
        AMOUNT_MISMATCH = "amount_mismatch"
        CURRENCY_MISMATCH = "currency_mismatch"
        STATUS_MISMATCH = "status_mismatch"
        # Refunds, by a charge's refunded total: the provider gave back more than the shop recorded
        # as refunded (a refund the shop has no record of), or less (a refund it does not have).
        PROVIDER_REFUND_WITHOUT_REFUND = "provider_refund_without_refund"
        REFUND_WITHOUT_PROVIDER_REFUND = "refund_without_provider_refund"

    kind = models.CharField(max_length=40, choices=Kind.choices)
    # The charge's reference, which is the payment's idempotency key (a provider reference is up to 500 characters).
    reference = models.CharField(max_length=500)
    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, null=True, blank=True, related_name="mismatches")
    provider_charge_id = models.CharField(max_length=100, blank=True, default="")
    details = models.TextField()
    found_at = models.DateTimeField(auto_now_add=True)
    resolved = models.BooleanField(default=False)

    class Meta:
        ordering = ["-found_at", "-id"]
        constraints = [
            # Each mismatch is reported once: a later run that finds it again adds nothing.
            models.UniqueConstraint(
                fields=["kind", "reference", "provider_charge_id"], name="payment_mismatch_reported_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.reference}"
