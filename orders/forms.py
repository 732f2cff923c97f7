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
