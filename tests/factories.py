from decimal import Decimal

import factory
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.utils import timezone

from orders.models import Product
from payments.services import new_idempotency_key


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"shopper{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.django.Password("correct-horse-battery")

    @factory.post_generation
    def email_confirmed(user, create: bool, extracted: bool | None, **kwargs) -> None:  # noqa: N805 (factory_boy's hook)
        """Signed up and confirmed, as every shopper who can sign in is; `email_confirmed=False` for one who did not.

        The row `accounts.services.confirm_email_of` writes, in one INSERT instead of its update_or_create's four
        statements (most tests make a user; a new one has no address yet).
        """
        if create and extracted is not False and user.email:
            EmailAddress.objects.create(user=user, email=user.email.lower(), verified=True, primary=True)


class AddressFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = "accounts.Address"

    owner = factory.SubFactory(UserFactory)
    name = factory.LazyAttribute(lambda address: address.owner.username.title())
    line1 = "1 Market Street"
    postal_code = "10115"
    city = "Berlin"
    country = "DE"


class ApiTokenFactory(factory.django.DjangoModelFactory):
    """A token whose raw value no one knows (only a digest is stored): for pages that list or revoke tokens."""

    class Meta:
        model = "accounts.ApiToken"

    user = factory.SubFactory(UserFactory)
    name = "a token"
    digest = factory.Sequence(lambda n: f"{n:064x}")


class ProductFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Product

    sku = factory.Sequence(lambda n: f"SKU-{n:04d}")
    name = factory.Sequence(lambda n: f"Product {n}")
    price = Decimal("10.00")
    stock = 100


class OrderFactory(factory.django.DjangoModelFactory):
    """A confirmed order with one line, made directly: no service runs, nothing is dispatched."""

    class Meta:
        model = "orders.Order"
        skip_postgeneration_save = True

    owner = factory.SubFactory(UserFactory)
    status = "confirmed"
    total = Decimal("20.00")
    item = factory.RelatedFactory(
        "tests.factories.OrderItemFactory", factory_related_name="order", quantity=2, unit_price=Decimal("10.00")
    )


class OrderItemFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = "orders.OrderItem"

    order = factory.SubFactory(OrderFactory, item=None)
    product = factory.SubFactory(ProductFactory)
    sku = factory.SelfAttribute("product.sku")
    name = factory.SelfAttribute("product.name")
    unit_price = factory.SelfAttribute("product.price")
    quantity = 1


class NotificationFactory(factory.django.DjangoModelFactory):
    """A pending order_confirmed notification for a new order, made directly: nothing is dispatched."""

    class Meta:
        model = "notifications.Notification"

    class Params:
        order = factory.SubFactory(OrderFactory)

    recipient = factory.SelfAttribute("order.owner")
    kind = "order_confirmed"
    object_type = "order"
    object_id = factory.SelfAttribute("order.pk")


class StockMovementFactory(factory.django.DjangoModelFactory):
    """A `received` ledger row, made directly: the product's stock is not touched."""

    class Meta:
        model = "orders.StockMovement"

    product = factory.SubFactory(ProductFactory)
    delta = 5
    kind = "received"
    reason = "delivery"


class PlanFactory(factory.django.DjangoModelFactory):
    """A monthly plan, active."""

    class Meta:
        model = "payments.Plan"
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"plan-{n}")
    name = factory.LazyAttribute(lambda plan: plan.code.title())
    price = Decimal("9.00")


class PaymentMethodFactory(factory.django.DjangoModelFactory):
    """A saved card, made directly: its token is unknown to the provider unless a test tokenises it there."""

    class Meta:
        model = "payments.PaymentMethod"

    owner = factory.SubFactory(UserFactory)
    provider_token = factory.Sequence(lambda n: f"pm_{n:024x}")
    brand = "visa"
    last4 = "4242"
    exp_month = 12
    exp_year = 2040


class SubscriptionFactory(factory.django.DjangoModelFactory):
    """An active subscription whose period starting today is due, made directly: nothing is dispatched."""

    class Meta:
        model = "payments.Subscription"

    owner = factory.SubFactory(UserFactory)
    plan = factory.SubFactory(PlanFactory)
    current_period_start = factory.LazyFunction(timezone.localdate)
    current_period_end = factory.SelfAttribute("current_period_start")
    billing_anchor = factory.SelfAttribute("current_period_start")


class PaymentFactory(factory.django.DjangoModelFactory):
    """A succeeded order payment, made directly: the provider knows nothing of it unless a test charges it."""

    class Meta:
        model = "payments.Payment"

    order = factory.SubFactory(OrderFactory)
    amount = factory.SelfAttribute("order.total")
    status = "succeeded"
    idempotency_key = factory.LazyFunction(new_idempotency_key)


class RefundFactory(factory.django.DjangoModelFactory):
    """A requested refund of the whole of a succeeded order payment, made directly: nothing is dispatched."""

    class Meta:
        model = "payments.Refund"

    payment = factory.SubFactory(PaymentFactory, order__total=Decimal("20.00"))
    amount = factory.SelfAttribute("payment.amount")
    idempotency_key = factory.Sequence(lambda n: f"ref_test_{n}")


class WebhookEventFactory(factory.django.DjangoModelFactory):
    """A received provider event for a charge, stored but not processed."""

    class Meta:
        model = "payments.WebhookEvent"

    class Params:
        charge_id = "ch_test"

    provider_event_id = factory.Sequence(lambda n: f"evt_{n}")
    type = "charge.succeeded"
    payload = factory.LazyAttribute(
        lambda event: {"id": event.provider_event_id, "type": event.type, "data": {"charge": {"id": event.charge_id}}}
    )


class ReportFactory(factory.django.DjangoModelFactory):
    """A pending sales report, made directly: nothing is generated."""

    class Meta:
        model = "reports.Report"

    owner = factory.SubFactory(UserFactory)


class FailedTaskFactory(factory.django.DjangoModelFactory):
    """A dead letter of orders.tasks.process_order on the critical queue."""

    class Meta:
        model = "ops.FailedTask"

    task_id = factory.Faker("uuid4")
    task_name = "orders.tasks.process_order"
    queue = "critical"
    args = factory.Sequence(lambda n: [n])
    exception = "ValueError: boom"
    traceback = "Traceback (most recent call last):\n  ...\nValueError: boom"


class OutboxItemFactory(factory.django.DjangoModelFactory):
    """A pending outbox item, due now, made directly: nothing is published until the relay runs."""

    class Meta:
        model = "core.OutboxItem"

    task_name = "notifications.tasks.send_notification"
    args = factory.Sequence(lambda n: [n])


class OrderEventFactory(factory.django.DjangoModelFactory):
    """A status change in an order's history, made directly (the pipeline writes the real ones)."""

    class Meta:
        model = "orders.OrderEvent"

    order = factory.SubFactory(OrderFactory)
    from_status = "pending"
    to_status = "confirmed"
    note = "stock reserved"


class SavedCartFactory(factory.django.DjangoModelFactory):
    """A signed-in shopper's cart kept with the account."""

    class Meta:
        model = "orders.SavedCart"

    owner = factory.SubFactory(UserFactory)
    quantities = factory.LazyFunction(lambda: {"MUG-001": 1})


class PaymentMismatchFactory(factory.django.DjangoModelFactory):
    """A disagreement with the provider's ledger, as reconciliation records it."""

    class Meta:
        model = "payments.PaymentMismatch"

    kind = "amount_mismatch"
    payment = factory.SubFactory(PaymentFactory)
    reference = factory.SelfAttribute("payment.idempotency_key")
    provider_charge_id = factory.Sequence(lambda n: f"ch_{n:024x}")
    details = "amount 12.50 != 10.00"


class OutgoingEmailFactory(factory.django.DjangoModelFactory):
    """A rendered account email waiting to be sent (notifications.services.queue_email also dispatches it)."""

    class Meta:
        model = "notifications.OutgoingEmail"

    kind = "account/email/email_confirmation_signup"
    to = factory.Sequence(lambda n: f"person{n}@example.com")
    subject = "[Shop] Please confirm your email address"
    body_text = "http://testserver/accounts/confirm-email/key/"
