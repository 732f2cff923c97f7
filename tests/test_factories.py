"""tests/factories.py has a factory for every model of the shop, and each one makes a valid row."""

import inspect

import factory
import pytest
from django.apps import apps

from tests import factories

pytestmark = pytest.mark.django_db

APPS = ("core", "accounts", "orders", "payments", "notifications", "reports", "ops")


def factory_models() -> dict[type, type]:
    found = {}
    for _, cls in inspect.getmembers(factories, inspect.isclass):
        if issubclass(cls, factory.django.DjangoModelFactory) and cls._meta.model is not None:
            model = cls._meta.get_model_class()
            found[model] = cls
    return found


def test_every_model_of_the_shop_has_a_factory():
    models = [model for model in apps.get_models() if model._meta.app_label in APPS]
    missing = sorted(model.__name__ for model in models if model not in factory_models())
    assert missing == [], f"add a factory to tests/factories.py for {missing}"


@pytest.mark.parametrize(
    "factory_class", sorted(factory_models().values(), key=lambda cls: cls.__name__), ids=lambda cls: cls.__name__
)
def test_each_factory_makes_a_row_that_passes_the_models_checks(factory_class):
    instance = factory_class()
    instance.full_clean(validate_unique=False)
    assert type(instance).objects.filter(pk=instance.pk).exists()
