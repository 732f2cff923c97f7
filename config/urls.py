from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from orders import views as order_views

from .api import api

urlpatterns = [
    path("", order_views.home, name="home"),
    path("orders/", include("orders.urls")),
    path("", include("payments.urls")),
    path("reports/", include("reports.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", api.urls),
    path("admin/", admin.site.urls),
    path("", include("ops.urls")),
]
