"""The prune's index (core.outbox.prune): built CONCURRENTLY on PostgreSQL, so a live outbox keeps taking writes
while it is built (the table may hold every item since the first deploy); a plain CREATE INDEX on SQLite.
The build waits for transactions older than itself to end."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            # A build that was interrupted (a timeout, a killed deploy) leaves an INVALID index of this name behind,
            # and migrating again would fail on it: it is dropped first. A valid one is never there (not migrated).
            with schema_editor.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname = %s AND pg_table_is_visible(c.oid)",
                    [self.index.name],
                )
                row = cursor.fetchone()
            if row and row[0]:
                schema_editor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{self.index.name}"')
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("core", "0001_initial"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="outboxitem",
            index=models.Index(condition=models.Q(("state", "done")), fields=["finished_at"], name="outbox_done"),
        ),
    ]
