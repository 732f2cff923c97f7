"""The order pipeline's speed, as ratios against ceilings measured in the same run on the same machine.

    python -m bench.pipeline [--quick] [--max-wait SECONDS] [--results DIR]

Starts the Procfile's processes (gunicorn with config/gunicorn.conf.py, the critical, bulk
and default workers, the sandbox without faults; no beat) on a PostgreSQL database of its
own (`bench_shop`, created, migrated and dropped here) and a private redis-server, then:

1. ceiling: `gunicorn bench.ceiling_wsgi` (the same config; one bare view, one INSERT) under
   16 client threads, then the order API (`POST /api/orders/`, two lines, an Idempotency-Key)
   under the same client, with no worker running: throughput, p50/p95/p99, their ratio;
2. the Celery ceiling on the critical worker: the round trip of sequential no-op tasks
   (bench.tasks.noop, publish to the client seeing it finished) and no-op tasks per second;
3. queue isolation: the queue wait (publish to start) of critical no-ops, idle and with
   5,000 bulk tasks queued (bench.tasks.hold, 50 ms each) while the bulk worker runs them,
   in alternating blocks so both conditions see the same machine;
4. the pipeline's maximum: a burst of orders, timed from the first POST to the last order
   fulfilled, and the critical worker's tasks per second over it (its metrics endpoint);
5. half that load, paced (open loop): created -> paid and created -> fulfilled from the
   orders' OrderEvent rows.

Each worker's pool processes are sampled from /proc throughout (VmRSS, VmHWM). Writes
bench/results/<date>.json and .png and prints a table (Markdown, as in the README).
Targets are reported, never asserted: order API >= 0.5 x the bare INSERT, isolation ratio
<= 1.2, created -> paid p95 <= 6 x the no-op round trip p95.

Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/bench_shop; the
database is dropped and re-created). Before measuring, it waits (up to --max-wait seconds)
for the 1-minute load average to fall below 1.5, and records the load either way.
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
CLIENT_THREADS = 16
PRODUCTS = 20
QUIET_LOAD = 1.5
SAMPLE_SECONDS = 0.25
ISOLATION_BLOCKS = 10
# The table bench/ceiling_wsgi.py inserts into.
CEILING_TABLE = "CREATE TABLE bench_ceiling_insert (id bigserial PRIMARY KEY, body text NOT NULL)"
WORKERS = ("worker-critical", "worker-bulk", "worker-default")
TARGETS = {
    "order_api_vs_bare_insert": (">=", 0.5),
    "isolation_queue_wait_p95_bulk_vs_idle": ("<=", 1.2),
    "created_to_paid_p95_vs_noop_round_trip_p95": ("<=", 6.0),
}


@dataclass(frozen=True)
class Sizes:
    http_seconds: float = 15.0
    http_warmup_seconds: float = 2.0
    round_trips: int = 300
    noop_burst: int = 4000
    bulk_queued: int = 5000
    bulk_task_seconds: float = 0.05
    isolation_probes: int = 600
    max_load_orders: int = 400
    half_load_seconds: float = 30.0


QUICK = Sizes(
    http_seconds=4.0,
    http_warmup_seconds=1.0,
    round_trips=60,
    noop_burst=600,
    bulk_queued=5000,
    isolation_probes=100,
    max_load_orders=120,
    half_load_seconds=8.0,
)


# --- The machine ----------------------------------------------------------------


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def wait_for_quiet_machine(max_wait: float) -> dict:
    """Poll the 1-minute load average until it is below QUIET_LOAD or max_wait seconds pass."""
    began = time.monotonic()
    while os.getloadavg()[0] >= QUIET_LOAD and time.monotonic() - began < max_wait:
        print(f"waiting for a quiet machine: load average {load_average()} (below {QUIET_LOAD} wanted)", flush=True)
        time.sleep(min(15, max(0.0, max_wait - (time.monotonic() - began))))
    return {
        "load_average_at_start": load_average(),
        "waited_seconds": round(time.monotonic() - began),
        "quiet": os.getloadavg()[0] < QUIET_LOAD,
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"^MemTotal:\s+(\d+)", meminfo, re.MULTILINE).group(1))
    git = shutil.which("git") or "git"
    try:
        commit = subprocess.run(  # noqa: S603 (a fixed command line)
            [git, "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            [git, "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": round(total_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit,
    }


# --- Processes --------------------------------------------------------------------


def procfile_command(name: str, env: dict[str, str]) -> list[str]:
    """The Procfile's command for a process, with ${VAR:-default} expanded and run by this interpreter."""
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            break
    else:
        raise KeyError(f"no {name} in the Procfile")
    command = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), command)
    argv = shlex.split(command)
    if argv[0] in ("celery", "gunicorn"):
        return [sys.executable, "-m", *argv]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def children_of(pid: int) -> list[int]:
    """A process's children, from /proc/<pid>/task/*/children."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


class MemorySampler(threading.Thread):
    """Peak VmRSS (sampled) and VmHWM of every pool process of the given workers, until stopped."""

    def __init__(self, workers: dict[str, int]):
        super().__init__(daemon=True)
        self.workers = workers
        self.peaks: dict[str, dict[int, dict[str, int]]] = {name: {} for name in workers}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.sample()

    def sample(self) -> None:
        from tests.stack import memory_kb

        for name, parent in self.workers.items():
            for pid in children_of(parent):
                peak = self.peaks[name].setdefault(pid, {"VmRSS": 0, "VmHWM": 0})
                for key, value in memory_kb(pid).items():
                    peak[key] = max(peak[key], value)

    def stop(self) -> dict:
        self.stopping.set()
        self.join()
        return {
            name: [
                {
                    "pid": pid,
                    "peak_rss_mb": round(peak["VmRSS"] / 1024, 1),
                    "peak_hwm_mb": round(peak["VmHWM"] / 1024, 1),
                }
                for pid, peak in sorted(children.items())
            ]
            for name, children in self.peaks.items()
        }


class Stack:
    """The bench's processes, started with the Procfile's commands and this run's environment."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        from tests.stack import Processes, RedisServer, free_port

        self.workdir = workdir
        self.processes = Processes(workdir)
        self.redis = RedisServer(workdir)
        self.free_port = free_port
        self.env = env
        self.web_port = free_port()
        self.web_url = f"http://127.0.0.1:{self.web_port}"
        self.workers: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}

    def start_redis(self) -> str:
        self.redis.start()
        return self.redis.url

    def start_sandbox(self) -> str:
        port = self.free_port()
        env = {
            **self.env,
            "SANDBOX_PORT": str(port),
            "SANDBOX_DB": str(self.workdir / "sandbox.sqlite3"),
            "SHOP_WEBHOOK_URL": f"{self.web_url}/payments/webhooks/provider/",
            "SANDBOX_ERROR_RATE": "0",
            "SANDBOX_TIMEOUT_RATE": "0",
            "SANDBOX_LATENCY_MS": "0",
            "SANDBOX_DECLINE_RATE": "0",
        }
        self.processes.spawn("sandbox", procfile_command("sandbox", env), env)
        url = f"http://127.0.0.1:{port}"
        self._wait_http(f"{url}/healthz", "the sandbox")
        return url

    def start_web(self, *, app: str = "config.wsgi", port: int | None = None) -> tuple[str, subprocess.Popen]:
        """gunicorn with config/gunicorn.conf.py serving `app`; returns its base URL once it answers."""
        port = port or self.web_port
        env = {**self.env, "GUNICORN_BIND": f"127.0.0.1:{port}"}
        command = [app if word == "config.wsgi" else word for word in procfile_command("web", env)]
        process = self.processes.spawn(f"web-{app}", command, env)
        url = f"http://127.0.0.1:{port}"
        self._wait_http(f"{url}/healthz", f"gunicorn {app}")
        return url, process

    def stop(self, process: subprocess.Popen) -> None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def start_workers(self) -> dict[str, int]:
        started = []
        for name in WORKERS:
            self.metrics_ports[name] = self.free_port()
            env = {**self.env, "CELERY_METRICS_PORT": str(self.metrics_ports[name])}
            worker = self.processes.spawn_worker(
                name, procfile_command(name, env), env, node=name.removeprefix("worker-")
            )
            self.workers[name] = worker.process
            started.append(worker)
        for worker in started:
            worker.wait_ready(90)
        return {name: process.pid for name, process in self.workers.items()}

    def _wait_http(self, url: str, what: str, timeout: float = 60) -> None:
        from tests.stack import http_ok

        deadline = time.monotonic() + timeout
        while not http_ok(url):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not answer {url} within {timeout} s:\n{self.processes.logs()}")
            time.sleep(0.2)

    def task_counts(self, worker: str) -> int:
        """Tasks the worker has run (any outcome), from its metrics endpoint."""
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"http://127.0.0.1:{self.metrics_ports[worker]}/metrics", timeout=5).text
        return round(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "celery_tasks"
                for sample in family.samples
                if sample.name == "celery_tasks_total"
            )
        )

    def shutdown(self) -> None:
        self.processes.stop_all()
        self.redis.kill()


# --- Database -------------------------------------------------------------------------


def recreate_database(url: str, *, drop_only: bool = False) -> None:
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    with psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if not drop_only:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def prepare_database() -> tuple[list[str], list[str]]:
    """Migrate, create the ceiling's table, a catalogue with ample stock and one API token per client."""
    from decimal import Decimal

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from accounts.services import issue_api_token
    from orders.models import Product

    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute(CEILING_TABLE)
    rng = random.Random(8)
    products = Product.objects.bulk_create(
        Product(
            sku=f"BENCH-{n:03d}", name=f"Bench product {n}", price=Decimal(rng.randint(100, 9999)) / 100, stock=10**9
        )
        for n in range(PRODUCTS)
    )
    users = get_user_model().objects.bulk_create(
        get_user_model()(username=f"bench-client-{n}") for n in range(CLIENT_THREADS)
    )
    return [product.sku for product in products], [issue_api_token(user=user) for user in users]


def order_request(skus: list[str], tokens: list[str]):
    """A RequestMaker for POST /api/orders/: two lines, the client's own token, a fresh Idempotency-Key."""

    def make(client: int, number: int) -> tuple[bytes, dict[str, str]]:
        first, second = random.Random(number).sample(skus, 2)
        body = json.dumps({"items": [{"sku": first, "quantity": 1}, {"sku": second, "quantity": 2}]}).encode()
        headers = {
            "Authorization": f"Bearer {tokens[client]}",
            "Content-Type": "application/json",
            "Idempotency-Key": uuid.uuid4().hex,
        }
        return body, headers

    return make


def wait_until_terminal(order_ids: list[int], timeout: float) -> float:
    """Poll until every order is in a terminal status; returns when that happened (time.time())."""
    from orders.models import Order

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Order.objects.filter(pk__in=order_ids).exclude(status__in=Order.TERMINAL).exists():
            return time.time()
        time.sleep(0.2)
    raise TimeoutError(f"orders not terminal within {timeout} s")


def order_timings(order_ids: list[int]) -> dict[str, list[float]]:
    """Wall-clock times per order: created, paid and fulfilled (seconds since the epoch), and final statuses."""
    from orders.models import Order, OrderEvent
    from payments.models import Payment

    created = dict(Order.objects.filter(pk__in=order_ids).values_list("pk", "created_at"))
    reached: dict[str, dict[int, datetime.datetime]] = {"confirmed": {}, "paid": {}, "fulfilled": {}}
    for order_id, status, at in OrderEvent.objects.filter(
        order_id__in=order_ids, to_status__in=reached.keys()
    ).values_list("order_id", "to_status", "created_at"):
        reached[status][order_id] = at
    statuses = dict(Order.objects.filter(pk__in=order_ids).values_list("pk", "status"))
    # A payment is claimed (created) just before the provider is called and saved with its outcome
    # just after: the span is the provider's share of created -> paid.
    charges = Payment.objects.filter(order_id__in=order_ids).values_list("created_at", "updated_at")
    return {
        "created": [created[pk].timestamp() for pk in order_ids],
        "to_confirmed": [
            (reached["confirmed"][pk] - created[pk]).total_seconds() for pk in order_ids if pk in reached["confirmed"]
        ],
        "to_paid": [(reached["paid"][pk] - created[pk]).total_seconds() for pk in order_ids if pk in reached["paid"]],
        "to_fulfilled": [
            (reached["fulfilled"][pk] - created[pk]).total_seconds() for pk in order_ids if pk in reached["fulfilled"]
        ],
        "charge_call": [(recorded - claimed).total_seconds() for claimed, recorded in charges],
        "fulfilled_at": sorted(at.timestamp() for at in reached["fulfilled"].values()),
        "not_fulfilled": sorted({status for status in statuses.values() if status != "fulfilled"}),
    }


def created_order_ids(samples) -> list[int]:
    return [json.loads(sample.body)["id"] for sample in samples if sample.status == 201]


# --- Phases -----------------------------------------------------------------------------


def http_phase(url: str, path: str, make_request, sizes: Sizes) -> dict:
    from bench import load

    load.closed_loop(url, path, make_request, threads=CLIENT_THREADS, seconds=sizes.http_warmup_seconds)
    samples = load.closed_loop(url, path, make_request, threads=CLIENT_THREADS, seconds=sizes.http_seconds)
    ok = [sample for sample in samples if sample.status == 201]
    began = samples[0].sent_at
    ended = max(sample.sent_at + sample.seconds for sample in samples)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "requests_per_second": round(len(ok) / (ended - began), 1),
        "latency_ms": load.percentiles_ms(sample.seconds for sample in ok),
        "_samples": samples,
    }


def publish_noop(queue: str, reply_to: str) -> float:
    from bench.tasks import noop

    sent_at = time.time()
    noop.apply_async((sent_at, reply_to), queue=queue)
    return sent_at


def sequential_probes(broker, count: int, reply_to: str) -> dict[str, list[float]]:
    """No-ops on the critical queue, one at a time: round trip (publish to seen finished) and queue wait."""
    round_trips, queue_waits = [], []
    for _ in range(count):
        began = time.perf_counter()
        publish_noop("critical", reply_to)
        answer = broker.blpop([reply_to], timeout=30)
        if answer is None:
            raise TimeoutError("a no-op task did not finish within 30 s")
        round_trips.append(time.perf_counter() - began)
        sent_at, started_at, _finished = json.loads(answer[1])
        queue_waits.append(started_at - sent_at)
    return {"round_trips": round_trips, "queue_waits": queue_waits}


def celery_ceiling(broker, sizes: Sizes) -> dict:
    from bench import load

    sequential_probes(broker, 50, "bench:warmup")
    probes = sequential_probes(broker, sizes.round_trips, "bench:round-trip")
    reply_to = "bench:burst"
    for _ in range(sizes.noop_burst):
        publish_noop("critical", reply_to)
    deadline = time.monotonic() + 300
    while broker.llen(reply_to) < sizes.noop_burst:
        if time.monotonic() > deadline:
            raise TimeoutError("no-op burst did not finish")
        time.sleep(0.1)
    records = [json.loads(item) for item in broker.lrange(reply_to, 0, -1)]
    first_start = min(started for _, started, _ in records)
    last_finish = max(finished for _, _, finished in records)
    return {
        "noop_round_trip_ms": load.percentiles_ms(probes["round_trips"], (50, 95)),
        "noop_tasks_per_second": round(len(records) / (last_finish - first_start), 1),
        "noop_burst": len(records),
        "_round_trips": probes["round_trips"],
    }


def isolation(broker, sizes: Sizes) -> dict:
    """Critical no-ops' queue wait, idle and with the bulk backlog queued, in alternating blocks.

    Between blocks the backlog is parked under another key (RENAME, O(1)) and put back, so
    both conditions share the same moments of the run and whatever else the machine does.
    """
    from bench import load
    from bench.tasks import hold

    parked = "bench:bulk-parked"
    for _ in range(sizes.bulk_queued):
        hold.apply_async((sizes.bulk_task_seconds,), queue="bulk")
    broker.rename("bulk", parked)
    idle, loaded, depths = [], [], []
    per_block = max(1, sizes.isolation_probes // ISOLATION_BLOCKS)
    for _ in range(ISOLATION_BLOCKS):
        # The bulk worker finishes the tasks it had reserved before the idle block starts.
        time.sleep(0.5)
        idle += sequential_probes(broker, per_block, "bench:isolation")["queue_waits"]
        broker.rename(parked, "bulk")
        time.sleep(0.5)
        depths.append(broker.llen("bulk"))
        loaded += sequential_probes(broker, per_block, "bench:isolation")["queue_waits"]
        broker.rename("bulk", parked)
    broker.delete(parked)
    return {
        "bulk_tasks_queued": sizes.bulk_queued,
        "bulk_task_seconds": sizes.bulk_task_seconds,
        "bulk_queue_depth_min": min(depths),
        "probes_per_condition": len(idle),
        "critical_queue_wait_idle_ms": load.percentiles_ms(idle, (50, 95)),
        "critical_queue_wait_bulk_ms": load.percentiles_ms(loaded, (50, 95)),
        "_idle_queue_waits": idle,
        "_bulk_queue_waits": loaded,
    }


def pipeline_max(stack: Stack, make_request, sizes: Sizes) -> dict:
    from bench import load

    tasks_before = stack.task_counts("worker-critical")
    samples = load.burst(
        stack.web_url, "/api/orders/", make_request, threads=CLIENT_THREADS, count=sizes.max_load_orders
    )
    order_ids = created_order_ids(samples)
    done_at = wait_until_terminal(order_ids, timeout=600)
    # Webhook tasks may still be finishing after the last order is fulfilled; they are part of the work.
    time.sleep(2)
    tasks = stack.task_counts("worker-critical") - tasks_before
    timings = order_timings(order_ids)
    began = samples[0].sent_at
    seconds = max(timings["fulfilled_at"][-1], began) - began
    return {
        "orders": len(order_ids),
        "post_errors": len(samples) - len(order_ids),
        "seconds": round(seconds, 2),
        "orders_per_second": round(len(timings["fulfilled_at"]) / seconds, 2),
        # From the first POST until 2 s after the last order is fulfilled (the last webhooks land then).
        "critical_tasks": tasks,
        "critical_tasks_per_second": round(tasks / (done_at + 2 - began), 1),
        "not_fulfilled": timings["not_fulfilled"],
        "_samples": samples,
        "_fulfilled_at": timings["fulfilled_at"],
    }


def pipeline_half(stack: Stack, make_request, rate: float, sizes: Sizes) -> dict:
    from bench import load

    count = max(10, round(rate * sizes.half_load_seconds))
    samples = load.paced(stack.web_url, "/api/orders/", make_request, threads=CLIENT_THREADS, rate=rate, count=count)
    order_ids = created_order_ids(samples)
    wait_until_terminal(order_ids, timeout=600)
    timings = order_timings(order_ids)
    began = samples[0].sent_at
    return {
        "target_orders_per_second": round(rate, 2),
        "orders": len(order_ids),
        "post_errors": len(samples) - len(order_ids),
        "orders_per_second": round(len(timings["fulfilled_at"]) / (timings["fulfilled_at"][-1] - began), 2),
        "created_to_confirmed_ms": load.percentiles_ms(timings["to_confirmed"], (50, 95)),
        "created_to_paid_ms": load.percentiles_ms(timings["to_paid"], (50, 95)),
        "created_to_fulfilled_ms": load.percentiles_ms(timings["to_fulfilled"], (50, 95)),
        "payment_claimed_to_recorded_ms": load.percentiles_ms(timings["charge_call"], (50, 95)),
        "not_fulfilled": timings["not_fulfilled"],
        "_samples": samples,
        "_to_paid": timings["to_paid"],
        "_to_fulfilled": timings["to_fulfilled"],
        "_fulfilled_at": timings["fulfilled_at"],
    }


# --- Results --------------------------------------------------------------------------------


def ratio(value: float | None, ceiling: float | None) -> float | None:
    return round(value / ceiling, 3) if value and ceiling else None


def verdicts(ratios: dict[str, float | None]) -> dict[str, dict]:
    result = {}
    for name, (op, bound) in TARGETS.items():
        value = ratios[name]
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        result[name] = {"target": f"{op} {bound}", "value": value, "met": met}
    return result


def markdown_table(results: dict) -> str:
    ceilings, ratios, targets = results["ceilings"], results["ratios"], results["targets"]
    api, half, iso = results["order_api"], results["pipeline"]["half_load"], results["isolation"]
    top = results["pipeline"]["max_load"]

    def lat(values: dict) -> str:
        return " / ".join(f"{value:g}" for value in values.values()) + " ms"

    def verdict(name: str) -> str:
        return f"{targets[name]['target']}: {'met' if targets[name]['met'] else 'MISSED'}"

    memory = "; ".join(
        f"{name.removeprefix('worker-')} {max((c['peak_hwm_mb'] for c in children), default=0):g}"
        f" ({len(children)} processes)"
        for name, children in results["memory_mb"].items()
    )
    rows = [
        ("figure", "measured", "ceiling (same run)", "ratio", "target"),
        (
            f"order API, {CLIENT_THREADS} clients",
            f"{api['requests_per_second']:g} req/s",
            f"bare INSERT view: {ceilings['bare_insert_requests_per_second']:g} req/s",
            f"{ratios['order_api_vs_bare_insert']}",
            verdict("order_api_vs_bare_insert"),
        ),
        (
            "order API latency p50 / p95 / p99",
            lat(api["latency_ms"]),
            f"bare INSERT view: {lat(ceilings['bare_insert_latency_ms'])}",
            "",
            "",
        ),
        (
            "pipeline max (POST -> fulfilled)",
            f"{top['orders_per_second']:g} orders/s",
            "",
            "",
            "",
        ),
        (
            "critical worker tasks/s at pipeline max",
            f"{top['critical_tasks_per_second']:g} tasks/s",
            f"no-op tasks: {ceilings['noop_tasks_per_second']:g} tasks/s",
            f"{ratios['pipeline_tasks_vs_noop_tasks']}",
            "",
        ),
        (
            f"created -> paid p50 / p95 at {half['target_orders_per_second']:g} orders/s (half max)",
            lat(half["created_to_paid_ms"]),
            f"no-op round trip p50 / p95: {lat(ceilings['noop_round_trip_ms'])}",
            f"{ratios['created_to_paid_p95_vs_noop_round_trip_p95']} (p95)",
            verdict("created_to_paid_p95_vs_noop_round_trip_p95"),
        ),
        ("of which created -> confirmed p50 / p95", lat(half["created_to_confirmed_ms"]), "", "", ""),
        (
            "of which the provider call p50 / p95 (payment claimed -> recorded)",
            lat(half["payment_claimed_to_recorded_ms"]),
            "",
            "",
            "",
        ),
        ("created -> fulfilled p50 / p95 (half max)", lat(half["created_to_fulfilled_ms"]), "", "", ""),
        (
            f"critical queue wait p50 / p95, {iso['bulk_tasks_queued']:,} bulk queued",
            lat(iso["critical_queue_wait_bulk_ms"]),
            f"idle: {lat(iso['critical_queue_wait_idle_ms'])}",
            f"{ratios['isolation_queue_wait_p95_bulk_vs_idle']} (p95)",
            verdict("isolation_queue_wait_p95_bulk_vs_idle"),
        ),
        ("peak RSS of a worker's pool process (MB)", memory, "limit: 200 MB per process", "", ""),
    ]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def public(phase: dict) -> dict:
    """A phase's figures without the raw series (keys starting with '_')."""
    return {key: value for key, value in phase.items() if not key.startswith("_")}


def configure(workdir: Path) -> dict[str, str]:
    """Production settings on the bench's database; returns the environment the processes start with."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SANDBOX_", "CELERY_", "REPORT_", "GUNICORN_", "DJANGO_"))
        and name not in ("SHOP_WEBHOOK_URL", "WEB_CONCURRENCY", "DATABASE_URL", "REDIS_URL", "EMAIL_URL")
        and not name.endswith("_CONCURRENCY")
    }
    env = {
        **inherited,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DEBUG": "false",
        "SECRET_KEY": "bench-only-" + "k" * 60,
        "WEBHOOK_SECRET": "bench-only-webhook-secret",
        "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_shop"),
        "VAR_DIR": str(workdir),
        "MEDIA_ROOT": str(workdir / "media"),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        "CELERY_EXTRA_IMPORTS": "bench.tasks",
        "PYTHONUNBUFFERED": "1",
    }
    (workdir / "metrics").mkdir()
    return env


def run(sizes: Sizes, max_wait: float) -> dict:
    quiet = wait_for_quiet_machine(max_wait)
    print(f"load average at start: {quiet['load_average_at_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        workdir = Path(tmp)
        env = configure(workdir)
        sys.path.insert(0, str(REPO_ROOT))
        stack = Stack(workdir, env)
        try:
            env["REDIS_URL"] = stack.start_redis()
            recreate_database(env["DATABASE_URL"])
            os.environ.update({k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
            import django

            django.setup()
            import redis

            skus, tokens = prepare_database()
            broker = redis.Redis.from_url(env["REDIS_URL"])
            env["PAYMENT_PROVIDER_URL"] = env["FULFILLMENT_API_URL"] = stack.start_sandbox()
            make_order = order_request(skus, tokens)
            return measure(stack, broker, make_order, sizes, quiet)
        except BaseException:
            print(stack.processes.logs()[-6000:], file=sys.stderr)
            raise
        finally:
            stack.shutdown()
            if "django.db" in sys.modules:
                sys.modules["django.db"].connections.close_all()
            recreate_database(env["DATABASE_URL"], drop_only=True)


def measure(stack: Stack, broker, make_order, sizes: Sizes, quiet: dict) -> dict:
    phases: dict[str, dict] = {}
    print("1/5 HTTP: bare INSERT ceiling, then the order API (no workers running)", flush=True)
    ceiling_url, ceiling = stack.start_web(app="bench.ceiling_wsgi", port=stack.free_port())
    phases["ceiling"] = http_phase(ceiling_url, "/insert/", make_order, sizes)
    stack.stop(ceiling)
    stack.start_web()
    phases["api"] = http_phase(stack.web_url, "/api/orders/", make_order, sizes)
    # Those orders stay pending: the pipeline phases start from an empty queue.
    broker.delete("critical")
    sampler = MemorySampler(stack.start_workers())
    sampler.start()
    print("2/5 Celery ceiling: no-op round trips and a no-op burst on the critical worker", flush=True)
    phases["celery"] = celery_ceiling(broker, sizes)
    print(f"3/5 isolation: critical no-ops with {sizes.bulk_queued:,} bulk tasks queued", flush=True)
    phases["isolation"] = isolation(broker, sizes)
    print(f"4/5 pipeline max: {sizes.max_load_orders} orders at once", flush=True)
    phases["max"] = pipeline_max(stack, make_order, sizes)
    rate = phases["max"]["orders_per_second"] / 2
    print(f"5/5 pipeline at half the max: {rate:.1f} orders/s for {sizes.half_load_seconds:g} s", flush=True)
    phases["half"] = pipeline_half(stack, make_order, rate, sizes)
    memory = sampler.stop()

    ceilings = {
        "bare_insert_requests_per_second": phases["ceiling"]["requests_per_second"],
        "bare_insert_latency_ms": phases["ceiling"]["latency_ms"],
        "noop_tasks_per_second": phases["celery"]["noop_tasks_per_second"],
        "noop_round_trip_ms": phases["celery"]["noop_round_trip_ms"],
    }
    ratios = {
        "order_api_vs_bare_insert": ratio(
            phases["api"]["requests_per_second"], ceilings["bare_insert_requests_per_second"]
        ),
        "pipeline_tasks_vs_noop_tasks": ratio(
            phases["max"]["critical_tasks_per_second"], ceilings["noop_tasks_per_second"]
        ),
        "isolation_queue_wait_p95_bulk_vs_idle": ratio(
            phases["isolation"]["critical_queue_wait_bulk_ms"]["p95"],
            phases["isolation"]["critical_queue_wait_idle_ms"]["p95"],
        ),
        "created_to_paid_p95_vs_noop_round_trip_p95": ratio(
            phases["half"]["created_to_paid_ms"]["p95"], ceilings["noop_round_trip_ms"]["p95"]
        ),
    }
    results = {
        "benchmark": "pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), **quiet},
        "setup": {
            "client_threads": CLIENT_THREADS,
            "web": "gunicorn config.wsgi -c config/gunicorn.conf.py (ceiling: bench.ceiling_wsgi)",
            "workers": {name: " ".join(procfile_command(name, {})[2:]) for name in WORKERS},
            "sizes": sizes.__dict__,
        },
        "ceilings": ceilings,
        "ratios": ratios,
        "p95s": {
            "order_api_latency_ms": phases["api"]["latency_ms"]["p95"],
            "bare_insert_latency_ms": ceilings["bare_insert_latency_ms"]["p95"],
            "noop_round_trip_ms": ceilings["noop_round_trip_ms"]["p95"],
            "created_to_paid_ms": phases["half"]["created_to_paid_ms"]["p95"],
            "created_to_fulfilled_ms": phases["half"]["created_to_fulfilled_ms"]["p95"],
            "critical_queue_wait_idle_ms": phases["isolation"]["critical_queue_wait_idle_ms"]["p95"],
            "critical_queue_wait_bulk_ms": phases["isolation"]["critical_queue_wait_bulk_ms"]["p95"],
        },
        "targets": verdicts(ratios),
        "order_api": public(phases["api"]),
        "pipeline": {"max_load": public(phases["max"]), "half_load": public(phases["half"])},
        "celery": public(phases["celery"]),
        "isolation": public(phases["isolation"]),
        "memory_mb": memory,
    }
    return {"results": results, "phases": phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for working on the bench itself")
    parser.add_argument(
        "--max-wait", type=float, default=60, help=f"seconds to wait for load < {QUIET_LOAD} first (default 60)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for the JSON, PNG and table")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    began = time.monotonic()
    outcome = run(sizes, args.max_wait)
    results = outcome["results"]
    results["wall_seconds"] = round(time.monotonic() - began)

    from bench.plot import plot

    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results.resolve() / datetime.date.today().isoformat()
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(outcome["phases"], results, stem.with_suffix(".png"))
    table = markdown_table(results)
    stem.with_suffix(".md").write_text(table + "\n")
    m = results["machine"]
    print()
    print(table)
    print()
    print(
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB RAM,"
        f" load average at start {m['load_average_at_start']}; run took {results['wall_seconds']} s"
    )
    print(f"results: {stem.with_suffix('.json')}, plot: {stem.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
