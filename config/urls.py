from allauth.account import views as account_views
from django.contrib import admin
from django.urls import include, path

from orders import views as order_views

from .api import api

urlpatterns = [
    path("", order_views.home, name="home"),
    path("orders/", include("orders.urls")),
    path("", include("payments.urls")),
    path("reports/", include("reports.urls")),
    # allauth's sign-in and sign-out, also under the names Django's own views had.
    path("accounts/login/", account_views.login, name="login"),
    path("accounts/logout/", account_views.logout, name="logout"),
    path("accounts/", include("accounts.urls")),
    path("accounts/", include("allauth.urls")),
    # With DEBUG on and the file email backend (make run): the emails written, readable in the browser.
    path("dev/emails/", include("notifications.urls")),
    path("api/", api.urls),
    path("admin/", admin.site.urls),
    path("", include("ops.urls")),
]
