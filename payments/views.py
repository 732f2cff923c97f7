from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from core.types import AuthenticatedHttpRequest

from . import services
from .forms import SubscribeForm
from .models import Payment, Plan, Subscription

MAX_WEBHOOK_BYTES = 64 * 1024


@login_required
def subscriptions(request: AuthenticatedHttpRequest) -> HttpResponse:
    subs = Subscription.objects.filter(owner=request.user).select_related("plan")
    payments = Payment.objects.filter(subscription__owner=request.user).select_related("subscription__plan")[:50]
    plans = Plan.objects.filter(active=True)
    return render(request, "payments/subscriptions.html", {"subscriptions": subs, "payments": payments, "plans": plans})


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
