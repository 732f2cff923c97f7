"""Each hop of the order pipeline on its own: database round trips, CPU ms and wall ms per order.

    python -m bench.hops [--broker redis|rabbitmq] [--orders 60] [--results DIR]

Production settings (config.settings.base, DEBUG off) in this one process, on a PostgreSQL database
of its own (`bench_hops`, created, migrated and dropped here), the broker (bench/brokers.py: a private
redis-server, or a virtual host of its own on the machine's RabbitMQ) and the sandbox provider as a
process of its own without faults. For each order:

1. `POST /api/orders/` through Django's test client (the whole middleware stack, no gunicorn);
2. then every outbox item that hop wrote, and every item those wrote, in the order written: the
   task run in this process (`Task.apply`: its code, its signals and the outbox's success
   bookkeeping; not the broker's delivery nor the worker's prefork hand-off, which the no-op round
   trip of bench/pipeline.py measures). Publishing is real: each hop's messages go to the broker
   (and are purged), as the worker's would.

Each hop is timed with `time.process_time` (this process's CPU: Python, the driver and the
publish; not PostgreSQL's nor the sandbox's) and `time.perf_counter` (wall), and its queries are
captured (Django's CaptureQueriesContext): their number and their time as the driver saw it. The
rest of the wall time is the provider or warehouse call, the broker and the time between.
The sandbox's own CPU over the run is read from /proc and reported per order. The statements
of the first order's hops are kept in the results, so that a change to a hop shows in its SQL.

Writes bench/results/<date>-hops.json and -hops.md (the table, as in the README).
Environment: BENCH_HOPS_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/bench_hops; dropped
and re-created).
"""

import argparse
import cProfile
import datetime
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import cpu
from bench.brokers import LABELS, BenchBroker
from bench.pipeline import (
    CLIENT_THREADS,
    REPO_ROOT,
    RESULTS_DIR,
    Stack,
    configure,
    load_settings,
    order_request,
    prepare_database,
    recreate_database,
    write_results,
)

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/bench_hops"
QUEUES = ("critical", "bulk", "default")


class Hop:
    """What one hop cost, measured around a callable."""

    def __init__(self, name: str):
        self.name = name
        self.queries = 0
        self.db_ms = 0.0
        self.cpu_ms = 0.0
        self.wall_ms = 0.0
        self.sql: list[str] = []

    def measure(self, work):
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as captured:
            cpu, wall = time.process_time(), time.perf_counter()
            outcome = work()
            self.wall_ms = (time.perf_counter() - wall) * 1000
            self.cpu_ms = (time.process_time() - cpu) * 1000
        self.queries = len(captured.captured_queries)
        self.db_ms = sum(float(query["time"]) for query in captured.captured_queries) * 1000
        self.sql = [query["sql"] for query in captured.captured_queries]
        return outcome


def one_order(client, make_order, number: int) -> list[Hop]:
    """The API hop, then every task the order's outbox items call, as the workers would run them."""
    from celery import current_app

    from core.models import OutboxItem

    since = OutboxItem.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    body, headers = make_order(number % CLIENT_THREADS, number)  # one token per client of bench.pipeline
    api = Hop("POST /api/orders/")
    response = api.measure(
        lambda: client.post(
            "/api/orders/",
            data=body,
            content_type="application/json",
            headers={"Authorization": headers["Authorization"], "Idempotency-Key": headers["Idempotency-Key"]},
        )
    )
    if response.status_code != 201:
        raise RuntimeError(f"the order API answered {response.status_code}: {response.content[:300]!r}")
    hops = [api]
    while True:
        items = list(OutboxItem.objects.filter(pk__gt=since).order_by("pk"))
        if not items:
            return hops
        since = items[-1].pk
        # Not the delayed ones (the reservation's expiry, 30 minutes on): the relay publishes them when due.
        for item in (item for item in items if item.attempts):
            task = current_app.tasks[item.task_name]
            hop = Hop(item.task_name)
            outcome = hop.measure(
                functools.partial(task.apply, args=item.args, kwargs=item.kwargs, task_id=str(item.task_id))
            )
            if outcome.failed():
                raise RuntimeError(f"{item.task_name}{tuple(item.args)} failed: {outcome.result!r}")
            hops.append(hop)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 2),
    }


def run(kind: str, orders: int, *, profile: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-hops-{kind}-") as tmp:
        workdir = Path(tmp)
        env = configure(workdir)
        env["DATABASE_URL"] = os.environ.get("BENCH_HOPS_DATABASE_URL", DEFAULT_DATABASE)
        broker = BenchBroker(kind, workdir)
        stack = Stack(workdir, env, broker)
        try:
            env.update(stack.start_broker())
            recreate_database(env["DATABASE_URL"])
            env["PAYMENT_PROVIDER_URL"] = env["FULFILLMENT_API_URL"] = stack.start_sandbox()
            sys.path.insert(0, str(REPO_ROOT))
            load_settings(env)
            from django.test import Client

            skus, tokens = prepare_database()
            make_order = order_request(skus, tokens)
            client = Client(HTTP_HOST="127.0.0.1")
            sandbox = dict(stack.processes.started)["sandbox"].pid
            # Warm: the first order imports the task modules and opens the connections.
            one_order(client, make_order, 0)
            # The sandbox's and PostgreSQL's CPU while the measured orders run (bench/cpu.py), besides this process's.
            cpu_before = cpu.snapshot({"sandbox": sandbox}, broker_pid=None)
            by_hop: dict[str, list[Hop]] = {}
            first: list[Hop] = []
            profiler = cProfile.Profile() if profile else None
            for number in range(1, orders + 1):
                if profiler:
                    profiler.enable()
                hops = one_order(client, make_order, number)
                if profiler:
                    profiler.disable()
                first = first or hops
                for hop in hops:
                    by_hop.setdefault(hop.name, []).append(hop)
                for queue in QUEUES:
                    broker.purge(queue)
            # Only the per-order figures are read here: the share of the cores (wall_seconds) is not.
            elsewhere = cpu.spent(
                cpu_before, cpu.snapshot({"sandbox": sandbox}, broker_pid=None), wall_seconds=1, orders=orders
            )["cpu_ms_per_order"]
            if profiler and profile:
                profiler.dump_stats(profile)  # read with: python -m pstats <file> (sort cumulative, stats 40)
            return {
                "broker": {"kind": kind, "label": broker.label, "server_version": broker.server_version()},
                "orders": orders,
                "hops": {
                    name: {
                        "per_order": round(len(hops) / orders, 2),
                        "queries": summary([hop.queries for hop in hops]),
                        "db_ms": summary([hop.db_ms for hop in hops]),
                        "cpu_ms": summary([hop.cpu_ms for hop in hops]),
                        "wall_ms": summary([hop.wall_ms for hop in hops]),
                    }
                    for name, hops in by_hop.items()
                },
                "sandbox_cpu_ms_per_order": elsewhere["sandbox"],
                "postgresql_cpu_ms_per_order": elsewhere["postgresql"],
                "first_order_sql": {hop.name: hop.sql for hop in first},
            }
        except BaseException:
            stack.print_logs()
            raise
        finally:
            stack.shutdown()
            recreate_database(env["DATABASE_URL"], drop_only=True)


def markdown_table(results: dict) -> str:
    rows = [
        f"Per hop on {results['broker']['label']}, {results['orders']} orders, p50 (p95); one process, "
        "its task code and the outbox's bookkeeping, without the broker's delivery.",
        "",
        "| hop | per order | queries | DB ms | CPU ms | wall ms |",
        "|---|---|---|---|---|---|",
    ]
    total = {"queries": 0.0, "db_ms": 0.0, "cpu_ms": 0.0, "wall_ms": 0.0}
    for name, hop in results["hops"].items():
        cells = [f"{hop[key]['p50']:g} ({hop[key]['p95']:g})" for key in total]
        rows.append(f"| `{name}` | {hop['per_order']:g} | " + " | ".join(cells) + " |")
        for key in total:
            total[key] += hop[key]["p50"] * hop["per_order"]
    rows.append("| **an order, all hops (p50 sums)** | | " + " | ".join(f"{v:.1f}" for v in total.values()) + " |")
    rows.append("")
    rows.append(f"The sandbox provider's own CPU: {results['sandbox_cpu_ms_per_order']:g} ms per order.")
    if "postgresql_cpu_ms_per_order" in results:
        rows.append(f"PostgreSQL's CPU (its server processes): {results['postgresql_cpu_ms_per_order']:g} ms an order.")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=list(LABELS), default="redis")
    parser.add_argument("--orders", type=int, default=60)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--profile", type=Path, help="also write a cProfile of the measured orders to this file")
    args = parser.parse_args()
    results = {"benchmark": "hops", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    results.update(run(args.broker, args.orders, profile=args.profile))
    write_results(args.results, f"{datetime.date.today().isoformat()}-hops", results, markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
