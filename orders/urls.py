from django.urls import path

from . import views

app_name = "orders"

urlpatterns = [
    path("", views.order_list, name="list"),
    path("new/", views.order_new, name="new"),
    path("<int:order_id>/", views.order_detail, name="detail"),
    path("<int:order_id>/cancel/", views.order_cancel, name="cancel"),
]
