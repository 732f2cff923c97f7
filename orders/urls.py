from django.urls import path

from . import views

app_name = "orders"

urlpatterns = [
    path("", views.order_list, name="list"),
    path("new/", views.order_new, name="new"),
    # A product is everyone's: it is named in the query (?sku=), not in the path, where ids name owned objects.
    path("product/", views.product_detail, name="product"),
    path("cart/", views.cart_detail, name="cart"),
    path("cart/add/", views.cart_add, name="cart_add"),
    path("cart/set/", views.cart_set, name="cart_set"),
    path("cart/remove/", views.cart_remove, name="cart_remove"),
    path("checkout/", views.checkout, name="checkout"),
    path("checkout/place/", views.checkout_place, name="checkout_place"),
    path("<int:order_id>/", views.order_detail, name="detail"),
    path("<int:order_id>/cancel/", views.order_cancel, name="cancel"),
]
