"""The account pages beyond django-allauth's: the profile, with saved addresses."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from core.types import AuthenticatedHttpRequest

from . import selectors, services
from .forms import AddressForm


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
