"""Users made before sign-up needed a confirmed email address (demo accounts, staff) keep signing in.

allauth refuses a sign-in whose email address is not verified (ACCOUNT_EMAIL_VERIFICATION =
"mandatory"). Addresses people typed before there was any verification are taken as verified once,
here; every address added from now on is confirmed by its emailed link.
"""

from django.conf import settings
from django.db import migrations


def verify_existing(apps, schema_editor):
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    EmailAddress = apps.get_model("account", "EmailAddress")
    known = set(EmailAddress.objects.values_list("email", flat=True))
    EmailAddress.objects.bulk_create(
        EmailAddress(user_id=user.pk, email=user.email.lower(), verified=True, primary=True)
        for user in User.objects.exclude(email="").only("pk", "email")
        if user.email.lower() not in known
    )


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("account", "0009_emailaddress_unique_primary_email"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(verify_existing, migrations.RunPython.noop)]
