from django.urls import path

from . import views

app_name = "payments"

urlpatterns = [
    path("subscriptions/", views.subscriptions, name="subscriptions"),
    path("subscriptions/subscribe/", views.subscribe, name="subscribe"),
    path("subscriptions/<int:subscription_id>/cancel/", views.cancel, name="cancel"),
    path("subscriptions/<int:subscription_id>/status/", views.subscription_status, name="subscription_status"),
    path("subscriptions/<int:subscription_id>/card/", views.subscription_card, name="subscription_card"),
    path("accounts/cards/", views.cards, name="cards"),
    path("accounts/cards/<int:payment_method_id>/remove/", views.card_remove, name="card_remove"),
    path("payments/webhooks/provider/", views.webhook, name="webhook"),
]
