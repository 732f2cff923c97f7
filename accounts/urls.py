from django.urls import path

from . import views

app_name = "accounts"

urlpatterns = [
    path("profile/", views.profile, name="profile"),
    path("profile/addresses/<int:address_id>/delete/", views.address_delete, name="address_delete"),
]
