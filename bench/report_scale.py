"""Report scale: sales reports over 200,000+ order lines on a real bulk worker, timed, with peak memory.

    python bench/report_scale.py [--lines 250000] [--formats csv,xlsx]

Fills a PostgreSQL database of its own with order lines (COPY; kept between runs when
the count already matches), starts `celery -A config worker -Q bulk -c 2` (prefork, the
default time limits of production settings), requests one staff report over every line
per format, all at once, and samples each pool process's resident memory from /proc
(VmRSS every 50 ms, and VmHWM, the kernel's own high-water mark) until every report
ends. Prints the numbers and writes them to bench/results/report_scale-<date>.json.
Exits non-zero if a report is not done with every line, runs past the soft time limit,
or a pool process peaks at or above 200 MB.

Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/shop_bench_reports;
created if missing) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/14): a Redis
database of its own, since the bench empties its `bulk` queue first.
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MEMORY_LIMIT_MB = 200
LINES_PER_ORDER = 4
PRODUCTS = 200
SHOPPERS = 100
STATUSES = ("confirmed", "paid", "fulfilled", "cancelled")
BENCH_STAFF = "bench-staff"
SAMPLE_SECONDS = 0.05


def configure(media_root: Path) -> dict[str, str]:
    """The environment of this process and the worker: production settings on the bench's database and broker."""
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DEBUG": "false",
        "SECRET_KEY": "bench-only-" + "b" * 60,
        "WEBHOOK_SECRET": "bench-only-webhook-secret",
        "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop_bench_reports"),
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "MEDIA_ROOT": str(media_root),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("REPORT_SOFT_TIME_LIMIT", "REPORT_TIME_LIMIT"):
        os.environ.pop(name, None)  # the production defaults are what is measured
    os.environ.update(env)
    sys.path.insert(0, str(REPO_ROOT))
    return dict(os.environ)


def create_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def copy_rows(model, objects) -> None:
    """COPY unsaved model instances (defaults applied by Django) into the model's table."""
    from django.db import connection

    fields = [field for field in model._meta.concrete_fields]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    statement = f"COPY {connection.ops.quote_name(model._meta.db_table)} ({columns}) FROM STDIN"
    with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
        for obj in objects:
            copy.write_row([field.get_db_prep_save(getattr(obj, field.attname), connection) for field in fields])
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor:
        # The next id after the copied ones; the table name is the model's, never input.
        cursor.execute(f"SELECT setval(pg_get_serial_sequence(%s, 'id'), (SELECT MAX(id) FROM {table}))", [table])  # noqa: S608


def seed(lines: int) -> float:
    """Make the database hold exactly `lines` order lines; returns the seconds spent (0 when already there)."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from orders.models import Order, OrderItem, Product
    from reports.models import Report

    User = get_user_model()
    Report.objects.all().delete()
    if OrderItem.objects.count() == lines and User.objects.filter(username=BENCH_STAFF, is_staff=True).exists():
        return 0.0
    began = time.monotonic()
    rng = random.Random(20250301)  # the same data on every machine
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE orders_orderitem, orders_orderevent, orders_order, orders_product CASCADE")
        User.objects.filter(username__startswith="bench-").delete()
        User.objects.create_user(BENCH_STAFF, is_staff=True)
        shoppers = User.objects.bulk_create(User(username=f"bench-shopper-{n}") for n in range(SHOPPERS))
        products = Product.objects.bulk_create(
            Product(sku=f"BENCH-{n:04d}", name=f"Bench product {n}", price=Decimal(rng.randint(100, 9999)) / 100)
            for n in range(PRODUCTS)
        )
        start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
        orders, items = [], []
        for order_id in range(1, lines // LINES_PER_ORDER + 2):
            picked = rng.sample(products, min(LINES_PER_ORDER, lines - len(items)))
            if not picked:
                break
            quantities = [rng.randint(1, 5) for _ in picked]
            created = start + datetime.timedelta(seconds=rng.randint(0, 365 * 86400))
            orders.append(
                Order(
                    id=order_id,
                    owner=rng.choice(shoppers),
                    status=rng.choice(STATUSES),
                    total=sum((p.price * q for p, q in zip(picked, quantities, strict=True)), Decimal("0.00")),
                    created_at=created,
                    updated_at=created,
                )
            )
            items.extend(
                OrderItem(order_id=order_id, product=p, sku=p.sku, name=p.name, unit_price=p.price, quantity=q)
                for p, q in zip(picked, quantities, strict=True)
            )
        copy_rows(Order, orders)
        for number, item in enumerate(items, start=1):
            item.id = number
        copy_rows(OrderItem, items)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE orders_order; ANALYZE orders_orderitem")
    return time.monotonic() - began


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid`, read from /proc/<pid>/stat (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def run(lines: int, formats: list[str]) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from reports import services
    from reports.models import Report
    from tests.stack import memory_kb, start_celery_worker

    staff = get_user_model().objects.get(username=BENCH_STAFF)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as logdir:
        log_path = Path(logdir) / "worker.log"
        worker = start_celery_worker("bulk", name="bench-bulk", env=os.environ, log_path=log_path, concurrency=2)
        try:
            worker.wait_ready(60)
            pool = children_of(worker.process.pid)
            idle = {pid: memory_kb(pid).get("VmRSS", 0) for pid in pool}
            peaks: dict[int, dict[str, int]] = {pid: {"VmRSS": 0, "VmHWM": 0} for pid in pool}
            requested = time.monotonic()
            reports = [services.request_report(owner=staff, kind="sales", filters={}, format=fmt).pk for fmt in formats]
            deadline = requested + settings.REPORT_TIME_LIMIT + 30
            while time.monotonic() < deadline:
                for pid in children_of(worker.process.pid):
                    sample = memory_kb(pid)
                    peak = peaks.setdefault(pid, {"VmRSS": 0, "VmHWM": 0})
                    for key, value in sample.items():
                        peak[key] = max(peak[key], value)
                if Report.objects.filter(pk__in=reports, status__in=Report.FINISHED).count() == len(reports):
                    break
                time.sleep(SAMPLE_SECONDS)
            wall = time.monotonic() - requested
            worker_log = worker.log()
        finally:
            worker.stop(timeout=20)

    results = []
    for report in Report.objects.filter(pk__in=reports).order_by("pk"):
        seconds = (report.finished_at - report.started_at).total_seconds() if report.finished_at else None
        results.append(
            {
                "report_id": report.pk,
                "format": report.format,
                "status": report.status,
                "failure_reason": report.failure_reason,
                "rows_written": report.rows_written,
                "seconds": round(seconds, 2) if seconds is not None else None,
                "file_mb": round(report.file.size / 2**20, 1) if report.is_downloadable else None,
            }
        )
    children = [
        {
            "pid": pid,
            "idle_rss_mb": round(idle.get(pid, 0) / 1024, 1),
            "peak_rss_sampled_mb": round(peak["VmRSS"] / 1024, 1),
            "peak_rss_hwm_mb": round(peak["VmHWM"] / 1024, 1),
        }
        for pid, peak in peaks.items()
    ]
    return {
        "wall_seconds": round(wall, 2),
        "reports": results,
        "pool_processes": children,
        "worker_errors": [line for line in worker_log.splitlines() if "ERROR" in line][:20],
    }


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    git = shutil.which("git")
    try:
        commit = subprocess.run(  # noqa: S603 (a fixed command line)
            [git, "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run([git, "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)  # noqa: S603
        dirty = bool(status.stdout)
    except (TypeError, OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(total_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit + ("+dirty" if dirty else ""),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=250_000, help="order lines in the report (default 250000)")
    parser.add_argument("--formats", default="csv,xlsx", help="comma-separated report formats (default csv,xlsx)")
    args = parser.parse_args()
    formats = [fmt.strip() for fmt in args.formats.split(",") if fmt.strip()]

    with tempfile.TemporaryDirectory(prefix="bench-media-") as media:
        configure(Path(media))
        create_database(os.environ["DATABASE_URL"])
        import django

        django.setup()
        import redis
        from django.conf import settings
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        redis.Redis.from_url(settings.CELERY_BROKER_URL).delete("bulk")
        seed_seconds = seed(args.lines)
        print(f"database: {args.lines} order lines ready (seeded in {seed_seconds:.1f} s)", flush=True)
        outcome = run(args.lines, formats)

    limits = {"soft_seconds": settings.REPORT_SOFT_TIME_LIMIT, "hard_seconds": settings.REPORT_TIME_LIMIT}
    problems = []
    for report in outcome["reports"]:
        if report["status"] != "done" or report["rows_written"] != args.lines:
            problems.append(f"report {report['report_id']} ({report['format']}): {report}")
        elif report["seconds"] >= limits["soft_seconds"]:
            problems.append(f"report {report['report_id']} took {report['seconds']} s, past the soft limit")
    for child in outcome["pool_processes"]:
        if max(child["peak_rss_hwm_mb"], child["peak_rss_sampled_mb"]) >= MEMORY_LIMIT_MB:
            problems.append(f"pool process {child['pid']} peaked at {child['peak_rss_hwm_mb']} MB")

    summary = {
        "benchmark": "report_scale",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "order_lines": args.lines,
        "worker": "celery -A config worker -Q bulk -c 2 --pool prefork",
        "limits": limits,
        "memory_limit_mb": MEMORY_LIMIT_MB,
        "machine": machine(),
        **outcome,
        "ok": not problems,
        "problems": problems,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"report_scale-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")

    print(f"{args.lines} order lines, bulk worker -c 2, limits {limits['soft_seconds']}/{limits['hard_seconds']} s")
    for report in outcome["reports"]:
        print(
            f"  {report['format']:>4}: {report['status']}, {report['rows_written']} rows in {report['seconds']} s,"
            f" {report['file_mb']} MB file"
        )
    for child in outcome["pool_processes"]:
        print(
            f"  pool process {child['pid']}: idle {child['idle_rss_mb']} MB,"
            f" peak {child['peak_rss_hwm_mb']} MB (VmHWM), {child['peak_rss_sampled_mb']} MB (sampled VmRSS)"
        )
    print(f"  wall time from request to the last report done: {outcome['wall_seconds']} s")
    print(f"results: {path.relative_to(REPO_ROOT)}")
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
