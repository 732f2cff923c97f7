from django import forms


class SubscribeForm(forms.Form):
    plan = forms.SlugField(max_length=50)


class SubscriptionCardForm(forms.Form):
    """The card a subscription is charged to: one of the owner's (the service checks whose)."""

    payment_method = forms.IntegerField(min_value=1)
