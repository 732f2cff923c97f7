from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"

    def ready(self) -> None:
        # The pipeline's receivers (a step failed for good, a payment settled by a webhook) connect on import.
        from . import pipeline  # noqa: F401
