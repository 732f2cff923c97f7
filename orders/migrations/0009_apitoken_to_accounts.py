"""ApiToken now belongs to accounts (accounts/migrations/0003): only the state leaves; the table stays."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0008_product_description"),
        ("accounts", "0003_apitoken_from_orders"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(state_operations=[migrations.DeleteModel(name="ApiToken")], database_operations=[]),
    ]
