from typing import TYPE_CHECKING, Any

from django import forms

from orders.models import Order

from .models import Report
from .services import ALLOWED_FILTERS, MAX_SKU_LENGTH

if TYPE_CHECKING:
    from django.contrib.auth.models import User


class ReportForm(forms.Form):
    """A report request. Filters become a dict of the filled-in fields; reports.services checks them.

    `owner` exists only for staff. A posted field the form does not have is refused, not ignored.
    """

    kind = forms.ChoiceField(choices=Report.Kind.choices, initial=Report.Kind.SALES)
    format = forms.ChoiceField(choices=Report.Format.choices, initial=Report.Format.CSV)
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    status = forms.ChoiceField(choices=[("", "Any status"), *Order.Status.choices], required=False)
    sku = forms.CharField(required=False, max_length=MAX_SKU_LENGTH, label="SKU")
    owner = forms.CharField(required=False, max_length=150, label="Customer (username)")

    ALWAYS_POSTED = ("csrfmiddlewaretoken",)

    def __init__(self, *args: Any, user: "User", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not user.is_staff:
            del self.fields["owner"]

    def clean(self) -> dict[str, Any] | None:
        cleaned = super().clean()
        unknown = sorted(key for key in self.data if key not in self.fields and key not in self.ALWAYS_POSTED)
        if unknown:
            shown = ", ".join(key[:50] for key in unknown[:5])
            raise forms.ValidationError(f"unknown field: {shown}", code="unknown_field")
        return cleaned

    def filters(self) -> dict[str, Any]:
        """The filled-in filters, as the service (and the API) take them."""
        filters: dict[str, Any] = {}
        for key in ALLOWED_FILTERS:
            value: Any = self.cleaned_data.get(key)
            if value not in (None, ""):
                filters[key] = value.isoformat() if hasattr(value, "isoformat") else value
        return filters
