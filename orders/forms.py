from typing import Any

from django import forms

from .models import Product
from .services import MAX_QUANTITY

QTY_PREFIX = "qty-"


class OrderForm(forms.Form):
    """One quantity field per product; a hidden key makes a double submit place one order."""

    idempotency_key = forms.CharField(widget=forms.HiddenInput, max_length=64, required=False)

    def __init__(self, *args: Any, products: list[Product], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.products = products
        for product in products:
            self.fields[QTY_PREFIX + product.sku] = forms.IntegerField(
                label=product.name,
                min_value=0,
                max_value=MAX_QUANTITY,
                required=False,
                widget=forms.NumberInput(attrs={"min": 0, "max": MAX_QUANTITY, "step": 1, "inputmode": "numeric"}),
            )

    def quantity_fields(self) -> list[tuple[Product, forms.BoundField]]:
        return [(product, self[QTY_PREFIX + product.sku]) for product in self.products]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        assert cleaned is not None  # BaseForm.clean returns cleaned_data
        posted = [key for key in self.data if key.startswith(QTY_PREFIX)]
        unknown = sorted(key[len(QTY_PREFIX) :] for key in posted if key not in self.fields)
        if unknown:
            raise forms.ValidationError(f"unknown sku: {', '.join(unknown)}", code="unknown_sku")
        if hasattr(self.data, "getlist"):
            repeated = sorted(key[len(QTY_PREFIX) :] for key in posted if len(self.data.getlist(key)) > 1)
            if repeated:
                raise forms.ValidationError(f"each sku may appear only once: {', '.join(repeated)}", code="duplicate")
        items = []
        for product in self.products:
            quantity = cleaned.get(QTY_PREFIX + product.sku)
            if quantity:
                items.append((product.sku, quantity))
        if not items and not self.errors:
            raise forms.ValidationError("choose a quantity of at least one product", code="empty")
        cleaned["items"] = items
        return cleaned


# --- Catalogue and cart ----------------------------------------------------------------

SKU_MAX_LENGTH = 64
SEARCH_MAX_LENGTH = 100
# A database id: anything larger is refused by the form before PostgreSQL would refuse it.
MAX_ID = 2**31 - 1


class CatalogueSearchForm(forms.Form):
    q = forms.CharField(label="Search by name or sku", max_length=SEARCH_MAX_LENGTH, required=False)


def _quantity_field(minimum: int) -> forms.IntegerField:
    return forms.IntegerField(
        label="Quantity",
        min_value=minimum,
        max_value=MAX_QUANTITY,
        error_messages={
            "invalid": f"The quantity must be a whole number from {minimum} to {MAX_QUANTITY}.",
            "required": "Enter a quantity.",
            "min_value": f"The quantity must be at least {minimum}.",
            "max_value": f"You can order at most {MAX_QUANTITY} of one product.",
        },
        widget=forms.NumberInput(attrs={"min": minimum, "max": MAX_QUANTITY, "step": 1, "inputmode": "numeric"}),
    )


class CartAddForm(forms.Form):
    sku = forms.CharField(max_length=SKU_MAX_LENGTH, widget=forms.HiddenInput)
    quantity = _quantity_field(1)


class CartSetForm(forms.Form):
    """A line's new quantity; 0 removes it."""

    sku = forms.CharField(max_length=SKU_MAX_LENGTH, widget=forms.HiddenInput)
    quantity = _quantity_field(0)


class CartRemoveForm(forms.Form):
    sku = forms.CharField(max_length=SKU_MAX_LENGTH, widget=forms.HiddenInput)


# --- Checkout ---------------------------------------------------------------------------

NEW = "new"
# The provider's sandbox cards, shown on the card form while DEBUG is on.
TEST_CARDS = [
    ("4242 4242 4242 4242", "succeeds"),
    ("4000 0000 0000 0002", "is declined (card_declined)"),
    ("4000 0000 0000 9995", "is declined (insufficient_funds)"),
    ("4000 0000 0000 0119", "fails the first attempt and succeeds on the retry"),
]
KEY_FIELD = forms.RegexField(
    regex=r"^[A-Za-z0-9_-]{16,64}$",
    widget=forms.HiddenInput,
    error_messages={"invalid": "this checkout's key is not valid", "required": "this checkout's key is missing"},
)


class SavedOrNewField(forms.RegexField):
    """One of the owner's saved rows by id, or "new"; whether the id is the owner's is the view's question (404)."""

    def __init__(self, *, label: str, choose: str) -> None:
        messages = {"invalid": f"{choose} from the list.", "required": f"{choose}."}
        super().__init__(regex=rf"^(?:{NEW}|[1-9][0-9]{{0,9}})$", max_length=10, label=label, error_messages=messages)

    def clean(self, value: Any) -> int | None:
        """The chosen id, or None for a new one."""
        cleaned = super().clean(value)
        if cleaned == NEW:
            return None
        if int(cleaned) > MAX_ID:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return int(cleaned)


class AddressFieldsForm(forms.Form):
    """A new address: the fields of accounts.models.Address, checked by accounts.services.clean_address."""

    name = forms.CharField(label="Name", max_length=100, required=False)
    line1 = forms.CharField(label="Address", max_length=200, required=False)
    line2 = forms.CharField(label="Address (line 2)", max_length=200, required=False)
    postal_code = forms.CharField(label="Postal code", max_length=20, required=False)
    city = forms.CharField(label="City", max_length=100, required=False)
    country = forms.CharField(
        label="Country",
        max_length=2,
        required=False,
        widget=forms.TextInput(attrs={"size": 2, "maxlength": 2, "placeholder": "DE", "autocomplete": "country"}),
    )

    ADDRESS_FIELDS = ("name", "line1", "line2", "postal_code", "city", "country")

    def new_address(self) -> dict[str, object]:
        return {name: self.cleaned_data.get(name, "") for name in self.ADDRESS_FIELDS}


class CheckoutForm(AddressFieldsForm):
    """Where to ship and what card to charge: a saved one of each, or a new one (the card tokenised at the provider)."""

    idempotency_key = KEY_FIELD
    address = SavedOrNewField(label="Address", choose="Choose an address")
    save_address = forms.BooleanField(label="Save this address for next time", required=False)
    card = SavedOrNewField(label="Card", choose="Choose a card")
    card_number = forms.CharField(
        label="Card number",
        max_length=23,
        required=False,
        widget=forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "cc-number"}),
    )
    exp_month = forms.IntegerField(
        label="Expiry month",
        min_value=1,
        max_value=12,
        required=False,
        widget=forms.NumberInput(attrs={"min": 1, "max": 12, "inputmode": "numeric", "autocomplete": "cc-exp-month"}),
    )
    exp_year = forms.IntegerField(
        label="Expiry year",
        min_value=2000,
        max_value=2100,
        required=False,
        widget=forms.NumberInput(
            attrs={"min": 2000, "max": 2100, "inputmode": "numeric", "autocomplete": "cc-exp-year"}
        ),
    )
    cvc = forms.CharField(
        label="CVC",
        max_length=4,
        required=False,
        widget=forms.PasswordInput(attrs={"inputmode": "numeric", "autocomplete": "cc-csc", "maxlength": 4}),
    )

    CARD_FIELDS = ("card_number", "exp_month", "exp_year", "cvc")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        assert cleaned is not None  # BaseForm.clean returns cleaned_data
        if "card" in cleaned and cleaned["card"] is None:
            for name in self.CARD_FIELDS:
                if cleaned.get(name) in (None, "") and name not in self.errors:
                    self.add_error(name, f"Enter the card's {self.fields[name].label.lower()}.")  # type: ignore[union-attr]
        return cleaned


class PlaceOrderForm(AddressFieldsForm):
    """The reviewed checkout, resent as hidden fields and checked again: the key makes a double submit one order."""

    idempotency_key = KEY_FIELD
    address_id = forms.IntegerField(min_value=1, max_value=MAX_ID, required=False, widget=forms.HiddenInput)
    payment_method_id = forms.IntegerField(min_value=1, max_value=MAX_ID, widget=forms.HiddenInput)
    cart_digest = forms.RegexField(regex=r"^[0-9a-f]{32}$", widget=forms.HiddenInput)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in self.ADDRESS_FIELDS:
            self.fields[name].widget = forms.HiddenInput()
