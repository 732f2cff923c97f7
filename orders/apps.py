from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"

    def ready(self) -> None:
        # Receivers connect on import: the pipeline's (a step failed for good, a payment settled by a
        # webhook) and the cart's (kept through sign-in).
        from . import pipeline, receivers  # noqa: F401
