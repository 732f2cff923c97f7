from collections.abc import Iterable

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from core.types import AuthenticatedHttpRequest

from . import selectors, services
from .forms import SubscribeForm, SubscriptionCardForm
from .models import Payment, Plan, Subscription

MAX_WEBHOOK_BYTES = 64 * 1024
# The newest payments of one subscription that its status answer carries (the page shows 50 in all).
STATUS_PAYMENTS = 12


def _charging(subscriptions: Iterable[Subscription]) -> set[int]:
    """The live subscriptions whose charge is under way: a payment processing, or a due period not yet claimed."""
    live = [sub for sub in subscriptions if sub.status != Subscription.Status.CANCELLED]
    if not live:
        return set()
    periods = {sub.current_period_end.isoformat() for sub in live}
    payments = Payment.objects.filter(subscription__in=live).filter(
        Q(status=Payment.Status.PROCESSING) | Q(billing_period__in=periods)
    )
    processing, claimed = set(), set()
    for subscription_id, billing_period, status in payments.values_list("subscription_id", "billing_period", "status"):
        claimed.add((subscription_id, billing_period))
        if status == Payment.Status.PROCESSING:
            processing.add(subscription_id)
    today = timezone.localdate()
    return {
        sub.pk
        for sub in live
        if sub.pk in processing
        or (sub.current_period_end <= today and (sub.pk, sub.current_period_end.isoformat()) not in claimed)
    }


@login_required
def subscriptions(request: AuthenticatedHttpRequest) -> HttpResponse:
    subs = list(Subscription.objects.filter(owner=request.user).select_related("plan"))
    payments = Payment.objects.filter(subscription__owner=request.user).select_related("subscription__plan")[:50]
    plans = Plan.objects.filter(active=True)
    context = {
        "subscriptions": subs,
        "payments": payments,
        "plans": plans,
        "in_flight": _charging(subs),
        "cards": list(selectors.payment_methods_for(owner=request.user)),
    }
    return render(request, "payments/subscriptions.html", context)


@login_required
@require_GET
def subscription_status(request: AuthenticatedHttpRequest, subscription_id: int) -> JsonResponse:
    """One subscription and its newest payments, for the subscriptions page to follow a charge without a reload."""
    subscription = get_object_or_404(
        Subscription.objects.select_related("plan"), pk=subscription_id, owner=request.user
    )
    payments = subscription.payments.all()[:STATUS_PAYMENTS]
    return JsonResponse(
        {
            "id": subscription.pk,
            "plan": subscription.plan.name,
            "status": subscription.status,
            "status_display": subscription.get_status_display(),
            "charging": subscription.pk in _charging([subscription]),
            "can_cancel": subscription.can_cancel,
            "current_period_start": subscription.current_period_start.isoformat(),
            "current_period_end": subscription.current_period_end.isoformat(),
            "payments": [
                {
                    "id": payment.pk,
                    "status": payment.status,
                    "status_display": payment.get_status_display(),
                    "amount": str(payment.amount),
                    "currency": payment.currency,
                    "billing_period": payment.billing_period,
                    "failure_reason": payment.failure_reason,
                    "created_at": payment.created_at.isoformat(),
                }
                for payment in payments
            ],
        }
    )


@login_required
@require_POST
def subscribe(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = SubscribeForm(request.POST)
    if not form.is_valid():
        messages.error(request, "unknown plan: choose one of the plans listed")
        return redirect("payments:subscriptions")
    live_before = set(
        Subscription.objects.filter(owner=request.user)
        .exclude(status=Subscription.Status.CANCELLED)
        .values_list("pk", flat=True)
    )
    try:
        subscription = services.subscribe(owner=request.user, plan_code=form.cleaned_data["plan"])
    except services.SubscriptionError as exc:
        messages.error(request, str(exc))
    else:
        if subscription.pk in live_before:
            # A second submit of the same form: the live subscription is the answer, nothing more is charged.
            messages.info(request, f"You are already subscribed to {subscription.plan.name}. Nothing more was charged.")
        else:
            messages.success(request, f"Subscribed to {subscription.plan.name}. The first payment is on its way.")
    return redirect("payments:subscriptions")


@login_required
@require_POST
def cancel(request: AuthenticatedHttpRequest, subscription_id: int) -> HttpResponse:
    get_object_or_404(Subscription, pk=subscription_id, owner=request.user)
    try:
        outcome = services.cancel_subscription(subscription_id=subscription_id, owner=request.user)
    except services.SubscriptionError as exc:
        messages.error(request, str(exc))
    else:
        if outcome.voided_charge:
            messages.success(
                request,
                "Subscription cancelled. A charge for it was still in progress: it was voided and will not be sent "
                "again. If your bank shows it anyway, it will be refunded.",
            )
        else:
            messages.success(request, "Subscription cancelled. Nothing more will be charged.")
    return redirect("payments:subscriptions")


@login_required
@require_POST
def subscription_card(request: AuthenticatedHttpRequest, subscription_id: int) -> HttpResponse:
    """Charge the subscription to another of the owner's cards; a past-due one is tried again with it at once."""
    get_object_or_404(Subscription, pk=subscription_id, owner=request.user)
    form = SubscriptionCardForm(request.POST)
    if not form.is_valid():
        messages.error(request, "choose one of your cards")
        return redirect("payments:subscriptions")
    try:
        subscription = services.set_subscription_payment_method(
            owner=request.user, subscription_id=subscription_id, payment_method_id=form.cleaned_data["payment_method"]
        )
    except services.UnknownPaymentMethod:
        # Someone else's card is no different from one that does not exist.
        raise Http404("no such card") from None
    except services.SubscriptionCancelled as exc:
        messages.error(request, str(exc))
    else:
        if subscription.retries_on_card_change:
            messages.success(
                request, "Card changed. The payment is being tried again with it; this page shows how it went."
            )
        elif subscription.status == Subscription.Status.PAST_DUE:
            # Its charge failed without a decline (needs attention): trying again could charge twice.
            messages.success(
                request,
                "Card changed. Your last payment is with our staff, who will sort it out; "
                "you will not be charged twice.",
            )
        else:
            messages.success(request, f"Card changed: the next payments of {subscription.plan.name} are taken from it.")
    return redirect("payments:subscriptions")


@login_required
@require_GET
def cards(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The shopper's saved cards (a new one is added at checkout), each removable."""
    return render(request, "payments/cards.html", {"cards": selectors.payment_methods_for(owner=request.user)})


@login_required
@require_POST
def card_remove(request: AuthenticatedHttpRequest, payment_method_id: int) -> HttpResponse:
    try:
        services.remove_payment_method(owner=request.user, payment_method_id=payment_method_id)
    except services.UnknownPaymentMethod:
        # Someone else's card is no different from one that does not exist.
        raise Http404("no such card") from None
    messages.success(request, "Card removed. Orders already paid with it keep it.")
    return redirect("payments:cards")


@csrf_exempt  # Authenticated by the provider's HMAC signature instead of a CSRF token.
@require_POST
def webhook(request: HttpRequest) -> JsonResponse:
    if int(request.META.get("CONTENT_LENGTH") or 0) > MAX_WEBHOOK_BYTES:
        return JsonResponse({"detail": "body too large"}, status=413)
    try:
        event, created = services.receive_webhook(
            body=request.body,
            signature_header=request.headers.get("Sandbox-Signature", ""),
            secret=settings.WEBHOOK_SECRET,
            tolerance=settings.WEBHOOK_TOLERANCE_SECONDS,
        )
    except services.WebhookRejected as exc:
        return JsonResponse({"detail": str(exc)}, status=400)
    return JsonResponse({"id": event.provider_event_id, "duplicate": not created}, status=200)
