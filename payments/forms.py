from django import forms


class SubscribeForm(forms.Form):
    plan = forms.SlugField(max_length=50)
