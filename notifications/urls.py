from django.urls import path

from . import devmail

app_name = "devmail"

urlpatterns = [
    path("", devmail.inbox, name="inbox"),
    path("<str:file>/<int:index>/", devmail.message, name="message"),
]
