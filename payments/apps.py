from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "payments"

    def ready(self) -> None:
        # What happens when a payment's work fails for good: the receivers connect on import.
        from . import receivers  # noqa: F401
