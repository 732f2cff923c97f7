"""The account pages beyond django-allauth's: the profile, with saved addresses."""

import secrets

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from core.types import AuthenticatedHttpRequest

from . import selectors, services
from .forms import AddressForm, ApiTokenForm


@login_required
@require_http_methods(["GET", "POST"])
def profile(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The signed-in user's account: email, addresses (add and delete), and links to the rest."""
    form = AddressForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.add_address(owner=request.user, **form.cleaned_data)
        except services.InvalidAddress as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            messages.success(request, "Address saved.")
            return redirect("accounts:profile")
    addresses = selectors.addresses_for(owner=request.user)
    return render(request, "accounts/profile.html", {"form": form, "addresses": addresses})


@login_required
@require_POST
def address_delete(request: AuthenticatedHttpRequest, address_id: int) -> HttpResponse:
    try:
        services.delete_address(owner=request.user, address_id=address_id)
    except services.UnknownAddress:
        # Someone else's address is no different from one that does not exist.
        return HttpResponse("Not found", status=404, content_type="text/plain")
    messages.success(request, "Address deleted. Orders placed with it keep their copy.")
    return redirect("accounts:profile")


@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The signed-in user's API tokens: create one (shown once, never stored), list them, revoke one."""
    new_token = ""
    form = ApiTokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            new_token = services.issue_api_token(
                user=request.user, name=form.cleaned_data["name"], form_key=form.cleaned_data["form_key"]
            )
        except services.InvalidApiToken as exc:
            form.add_error("name", str(exc))
        else:
            if not new_token:
                messages.info(
                    request, "That form already made a token (it is shown only once). Make another if you need one."
                )
    fresh = ApiTokenForm(initial={"form_key": secrets.token_hex(16)})
    context = {
        "form": form if form.errors else fresh,
        "new_token": new_token,
        "tokens": selectors.api_tokens_for(owner=request.user),
    }
    # A page that shows a secret is never kept by a cache.
    response = render(request, "accounts/api_tokens.html", context)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def api_token_revoke(request: AuthenticatedHttpRequest, token_id: int) -> HttpResponse:
    try:
        services.revoke_api_token(owner=request.user, token_id=token_id)
    except services.UnknownApiToken:
        return HttpResponse("Not found", status=404, content_type="text/plain")
    messages.success(request, "Token revoked: it no longer signs in to the API.")
    return redirect("accounts:api_tokens")
