from django.conf import settings
from django.db import models


class Notification(models.Model):
    """One customer email about one object, sent at most once.

    The unique (kind, object_type, object_id) is what makes a second notify or a
    second task delivery a no-op.
    """

    class Kind(models.TextChoices):
        ORDER_CONFIRMED = "order_confirmed"
        ORDER_PAID = "order_paid"
        ORDER_PAYMENT_FAILED = "order_payment_failed"
        ORDER_FULFILLED = "order_fulfilled"
        SUBSCRIPTION_CHARGED = "subscription_charged"
        SUBSCRIPTION_DECLINED = "subscription_declined"
        # After the last retry of a declined renewal (payments/dunning.py): the subscription ended.
        SUBSCRIPTION_CANCELLED_UNPAID = "subscription_cancelled_unpaid"
        ORDER_EXPIRED = "order_expired"
        REFUND_REQUESTED = "refund_requested"
        REFUND_SUCCEEDED = "refund_succeeded"

    class ObjectType(models.TextChoices):
        ORDER = "order"
        PAYMENT = "payment"
        SUBSCRIPTION = "subscription"
        REFUND = "refund"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"

    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    kind = models.CharField(max_length=40, choices=Kind.choices)
    object_type = models.CharField(max_length=20, choices=ObjectType.choices)
    object_id = models.PositiveBigIntegerField()
    # Filled from the templates when sent: the record of what the customer received.
    subject = models.CharField(max_length=255, blank=True, default="")
    body_text = models.TextField(blank=True, default="")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "object_type", "object_id"], name="notification_once_per_kind_object"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.object_type} #{self.object_id} ({self.status})"


class OutgoingEmail(models.Model):
    """An email rendered when it was asked for (an account's confirmation link, a password reset), sent at most once.

    Unlike a Notification, its content cannot be rendered again later (it carries a one-time
    link), so the message is stored; its bodies are wiped once it is sent, so the database keeps
    no usable link.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"

    # What it is, in the words of the code that asked for it (allauth's template prefix).
    kind = models.CharField(max_length=100)
    to = models.EmailField(max_length=254)
    subject = models.CharField(max_length=255)
    body_text = models.TextField(blank=True, default="")
    body_html = models.TextField(blank=True, default="")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} to {self.to} ({self.status})"
