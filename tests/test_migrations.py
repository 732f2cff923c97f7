"""The migrations make the schema the models describe.

The unit tier builds its test databases from the models (`make test-unit`: pytest-django's --no-migrations,
0.75 s a database instead of 2.8 s); every other tier, `make run` and the compose stack migrate. Both are the
same schema only while no model change lacks its migration.
"""

import pytest
from django.core.management import call_command


def test_no_model_change_lacks_its_migration(db, capsys, settings):
    settings.MIGRATION_MODULES = {}  # each app's own migrations, which --no-migrations hides
    try:
        call_command("makemigrations", "--check", "--dry-run", verbosity=1)
    except SystemExit:  # what --check does when a migration is missing
        pytest.fail(f"models changed without a migration:\n{capsys.readouterr().out}")
    assert "No changes detected" in capsys.readouterr().out
