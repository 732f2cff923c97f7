"""The order API under gunicorn's worker classes: gthread (the Procfile's) against sync, and keep-alive's spread.

    python -m bench.web [--seconds 15] [--rounds 2] [--results DIR]

Each variant serves `POST /api/orders/` with config/gunicorn.conf.py and production settings, its options
changed through GUNICORN_CMD_ARGS (which gunicorn reads after the configuration file), on a database of its
own (`bench_shop`, as bench.pipeline's) and a private redis-server as the broker. No worker runs: the API's
work ends with its publish. The same 16 client threads as `make bench-pipeline` (each on its own keep-alive
connection, bench/load.py) drive it for `--seconds` after a warm-up; the variants take turns, `--rounds`
times. Each gunicorn worker's share of the requests is read from an access log that records the worker's
pid: with keep-alive, a connection stays with the worker that accepted it.

Variants:
- `gthread 2x2`: the Procfile's (WEB_CONCURRENCY=2 workers, GUNICORN_THREADS=2 threads each, keep-alive 2 s);
- `gthread 2x2, no keep-alive`: the same, each connection closed after its response (`--keep-alive 0`);
- `sync 4`: four single-threaded workers (the sync class closes each connection after its response).

Writes bench/results/<date>-web.json and -web.md.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.brokers import BenchBroker
from bench.pipeline import (
    CLIENT_THREADS,
    REPO_ROOT,
    RESULTS_DIR,
    Stack,
    configure,
    load_settings,
    machine,
    order_request,
    prepare_database,
    recreate_database,
    write_results,
)

VARIANTS: dict[str, str] = {
    "gthread 2x2": "--worker-class gthread --workers 2 --threads 2",
    "gthread 2x2, no keep-alive": "--worker-class gthread --workers 2 --threads 2 --keep-alive 0",
    "sync 4": "--worker-class sync --workers 4 --threads 1",
}


def serve(stack: Stack, name: str, options: str, access_log: Path, seconds: float, make_request) -> dict:
    from bench import load

    stack.env["GUNICORN_CMD_ARGS"] = f"{options} --access-logfile {access_log} --access-logformat '%(p)s %(s)s'"
    url, process = stack.start_web(port=stack.free_port())
    try:
        load.closed_loop(url, "/api/orders/", make_request, threads=CLIENT_THREADS, seconds=2)
        access_log.write_text("")  # the warm-up's requests are not counted
        samples = load.closed_loop(url, "/api/orders/", make_request, threads=CLIENT_THREADS, seconds=seconds)
    finally:
        stack.stop(process)
    ok = [sample for sample in samples if sample.status == 201]
    began = samples[0].sent_at
    ended = max(sample.sent_at + sample.seconds for sample in samples)
    per_worker = Counter(line.split()[0] for line in access_log.read_text().splitlines() if line.strip())
    shares = sorted(per_worker.values(), reverse=True)
    return {
        "variant": name,
        "options": options,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "requests_per_second": round(len(ok) / (ended - began), 1),
        "latency_ms": load.percentiles_ms([sample.seconds for sample in ok]),
        "requests_per_worker": shares,
        "busiest_worker_share": round(shares[0] / sum(shares), 3) if shares else None,
    }


def run(seconds: float, rounds: int) -> dict:
    began = time.monotonic()
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        workdir = Path(tmp)
        env = configure(workdir)
        sys.path.insert(0, str(REPO_ROOT))
        stack = Stack(workdir, env, BenchBroker("redis", workdir))
        try:
            env.update(stack.start_broker())
            recreate_database(env["DATABASE_URL"])
            load_settings(env)
            skus, tokens = prepare_database()
            make_order = order_request(skus, tokens)
            runs = [
                serve(stack, name, options, workdir / f"access-{n}-{i}.log", seconds, make_order)
                for n in range(rounds)
                for i, (name, options) in enumerate(VARIANTS.items())
            ]
        except BaseException:
            stack.print_logs()
            raise
        finally:
            stack.shutdown()
    return {
        "benchmark": "bench.web",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "clients": CLIENT_THREADS,
        "seconds_each": seconds,
        "runs": runs,
        "wall_seconds": round(time.monotonic() - began),
    }


def markdown(result: dict) -> str:
    lines = [
        f"The order API, {result['clients']} clients, {result['seconds_each']:g} s a run, variants in turn "
        f"({result['date']}, commit {result['machine']['commit']}; 1-minute load average "
        f"{result['load_average_at_start'][0]:g} at the start).",
        "",
        "| variant | req/s (each run) | median req/s | p50 / p95 / p99 ms (median run) "
        "| requests per worker (each run) |",
        "|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        runs = [r for r in result["runs"] if r["variant"] == name]
        rates = [r["requests_per_second"] for r in runs]
        middle = sorted(runs, key=lambda r: r["requests_per_second"])[len(runs) // 2]
        latency = " / ".join(f"{v:g}" for v in middle["latency_ms"].values())
        workers = "; ".join(", ".join(str(n) for n in r["requests_per_worker"]) for r in runs)
        lines.append(
            f"| {name} | {', '.join(f'{v:g}' for v in rates)} | {statistics.median(rates):g} | {latency} | {workers} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds of each run (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, taking turns (default 2)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for the JSON and the table")
    args = parser.parse_args()
    result = run(args.seconds, args.rounds)
    write_results(args.results, f"{result['date']}-web", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
