"""Database statements the ORM does not offer."""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from django.db import connection, models, transaction
from django.db.models import Field


def _not_null(fields: dict[str, Field], names: Sequence[str]) -> str:
    return (
        "WHERE " + " AND ".join(f"{connection.ops.quote_name(fields[name].column)} IS NOT NULL" for name in names) + " "
    )


def insert_unless_exists(instance: models.Model, *, unique: Sequence[str], partial: bool = False) -> bool:
    """INSERT the new instance unless a row with the same `unique` fields exists; True (and its pk set) if inserted.

    One statement, `INSERT ... ON CONFLICT (unique) DO NOTHING RETURNING pk`, where
    `get_or_create` takes four round trips (a SELECT, a savepoint, the INSERT, its release)
    and Django's `bulk_create(ignore_conflicts=True)` cannot tell whether the row was new.
    Safe in the caller's transaction: a conflict raises nothing, so no savepoint is needed.
    `unique` must name the fields of a unique constraint of the model; `partial` for a constraint
    that holds where those fields are not null (its index is then found by that predicate). Any
    other constraint the row breaks raises IntegrityError.
    """
    meta = instance._meta
    pk = meta.pk
    assert pk is not None and instance.pk is None, "insert_unless_exists inserts a new instance"
    fields = [field for field in meta.concrete_fields if field is not pk]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    by_name = {field.name: field for field in fields}
    conflict = ", ".join(connection.ops.quote_name(by_name[name].column) for name in unique)
    values = [field.get_db_prep_save(field.pre_save(instance, add=True), connection) for field in fields]
    sql = (
        f"INSERT INTO {connection.ops.quote_name(meta.db_table)} ({columns}) "  # noqa: S608 (names from the model)
        f"VALUES ({', '.join(['%s'] * len(fields))}) "
        f"ON CONFLICT ({conflict}) {_not_null(by_name, unique) if partial else ''}"
        f"DO NOTHING RETURNING {connection.ops.quote_name(pk.column)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        row = cursor.fetchone()
    if row is None:
        return False
    instance.pk = row[0]
    instance._state.adding = False
    instance._state.db = connection.alias
    return True


@contextmanager
def one_snapshot() -> Iterator[None]:
    """The reads inside see the database as of one moment: a row and the rows read after it agree.

    PostgreSQL's default isolation (READ COMMITTED) gives each statement a snapshot of its own, so a row read
    and its relations read a moment later (prefetch_related) can straddle another transaction's commit. Here
    they share one: a READ ONLY, REPEATABLE READ transaction (two statements more). Inside a transaction
    already begun it adds nothing: that transaction's isolation holds. On another database (make run's
    SQLite) it adds nothing either: SQLite's transactions begin IMMEDIATE there, a write lock, and every
    order page would wait for the workers' writes.
    """
    if connection.in_atomic_block or connection.vendor != "postgresql":
        yield
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def set_prefetched(instance: models.Model, **relations: Iterable[models.Model]) -> None:
    """Give `instance` its related rows as prefetch_related would have loaded them, from objects in hand (rows
    just written), so that nothing reads them back; prefetching such a relation later queries nothing."""
    cache = instance.__dict__.setdefault("_prefetched_objects_cache", {})
    for name, objects in relations.items():
        loaded = getattr(instance, name).all()
        # What Django's prefetch_related does with the rows it read (django.db.models.query.prefetch_one_level).
        loaded._result_cache = list(objects)
        loaded._prefetch_done = True
        cache[name] = loaded
