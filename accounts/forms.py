from allauth.account import forms as allauth_forms
from django import forms

from .models import Address


class AddressForm(forms.ModelForm):
    """The fields of a saved address; the rules are the service's (accounts.services.clean_address)."""

    class Meta:
        model = Address
        fields = ["name", "line1", "line2", "postal_code", "city", "country"]
        widgets = {"country": forms.TextInput(attrs={"size": 2, "maxlength": 2, "placeholder": "DE"})}


# RFC 5321: a mailbox is at most 254 characters, its local part at most 64. allauth's fields do
# not check it, and the user model's field would cut a longer address short (mail then goes to
# an address the person never typed).
MAX_EMAIL_LENGTH = 254
MAX_LOCAL_PART_LENGTH = 64


def check_email_length(email: str) -> None:
    local, _, _ = email.rpartition("@")
    if len(email) > MAX_EMAIL_LENGTH or len(local) > MAX_LOCAL_PART_LENGTH:
        raise forms.ValidationError(
            f"An email address has at most {MAX_EMAIL_LENGTH} characters, {MAX_LOCAL_PART_LENGTH} before the @."
        )


class SignupForm(allauth_forms.SignupForm):
    def clean_email(self) -> str:
        check_email_length(self.cleaned_data.get("email", ""))
        return super().clean_email()


class AddEmailForm(allauth_forms.AddEmailForm):
    def clean_email(self) -> str:
        check_email_length(self.cleaned_data.get("email", ""))
        return super().clean_email()


class ApiTokenForm(forms.Form):
    """A name for a new API token, and the form's own key: a second submit of the same form makes no second token."""

    name = forms.CharField(max_length=100, required=False, strip=True)
    form_key = forms.RegexField(regex=r"^[0-9a-f]{32}$", widget=forms.HiddenInput)
