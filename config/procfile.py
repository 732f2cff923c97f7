"""`python -m config.procfile [--grace S] [--append NAME=ARGS] [--after NAME=OTHER,...] [PROCFILE]`: `make run`.

Starts every line of the Procfile, prints their output prefixed with the process name, and on Ctrl-C
(SIGINT) or SIGTERM stops them the way their own documentation asks: one SIGTERM to each line's main
process, which shuts down warm (gunicorn stops its workers, a Celery worker lets its pool processes
finish their tasks and exit, beat saves its schedule). A process still running `--grace` seconds later
gets SIGKILL, with its process group. A second Ctrl-C kills at once.

It replaces honcho 2.0.0, which cannot stop a Celery worker cleanly: it sends SIGTERM to each
process's whole group, so every pool process is killed under its worker (one ERROR line each), it
sends SIGKILL to whatever still runs 5 s after the first process exits (a constant, no option), it
exits 130 or 143 after Ctrl-C (make reports that as an error), and it reads a `.env` file, which
here is docker compose's (database on `db:5432`, DEBUG off).

Each line runs as `/bin/sh -c "exec LINE"` (so `${VAR:-default}` expands and the shell's pid is the
process's) in a session of its own, so the terminal's Ctrl-C reaches this process only.
Exit status: 0 when a signal asked for the stop and every process stopped within the grace period;
1 when a process exited by itself (the others are then stopped) or had to be killed.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

# Warm shutdowns take a few seconds when idle; a task that is running gets this long to finish.
DEFAULT_GRACE_SECONDS = 30.0
# A process held back by --after starts anyway after this long.
READY_TIMEOUT_SECONDS = 60.0


def read_procfile(path: Path) -> dict[str, str]:
    """`name: command` lines, in order; blank lines and `#` comments are skipped."""
    processes = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = command.strip()
    return processes


@dataclass(eq=False)
class Child:
    name: str
    command: str
    process: subprocess.Popen = field(init=False)
    relay: threading.Thread = field(init=False)

    def start(self, env: dict[str, str], printer: "Printer") -> None:
        self.process = subprocess.Popen(  # noqa: S602 (a Procfile line is shell syntax)
            f"exec {self.command}",
            shell=True,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        printer.system(f"{self.name} started (pid={self.process.pid})")
        self.relay = threading.Thread(target=printer.relay, args=(self.name, self.process.stdout), daemon=True)
        self.relay.start()

    def signal(self, signum: int, *, group: bool = False) -> None:
        try:
            if group:
                os.killpg(self.process.pid, signum)
            else:
                os.kill(self.process.pid, signum)
        except ProcessLookupError:
            pass


class Printer:
    def __init__(self, names: list[str]):
        self.width = max(len(name) for name in [*names, "system"])
        self.lock = threading.Lock()
        self.ready: set[str] = set()

    def line(self, name: str, text: str) -> None:
        with self.lock:
            sys.stdout.write(f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | {text}\n")
            sys.stdout.flush()

    def system(self, text: str) -> None:
        self.line("system", text)

    def relay(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode(errors="replace").rstrip("\n")
            if text.endswith(" ready."):
                self.ready.add(name)
            self.line(name, text)
        stream.close()


def run(processes: dict[str, str], *, grace: float, after: dict[str, list[str]] | None = None) -> int:
    """Run the processes until a signal or until one exits; `after` holds a process back until others are ready."""
    after = after or {}
    printer = Printer(list(processes))
    children = [Child(name, command) for name, command in processes.items()]
    held = [child for child in children if child.name in after]
    held_until = time.monotonic() + READY_TIMEOUT_SECONDS
    stop_requests: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requests.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for child in children:
        if child not in held:
            child.start(env, printer)

    exited_by_itself = None
    while not stop_requests:
        for child in list(held):
            if set(after[child.name]) <= printer.ready or time.monotonic() > held_until:
                held.remove(child)
                child.start(env, printer)
        started = [child for child in children if child not in held]
        exited_by_itself = next((child for child in started if child.process.poll() is not None), None)
        if exited_by_itself:
            printer.system(f"{exited_by_itself.name} exited with {exited_by_itself.process.returncode}")
            break
        time.sleep(0.1)
    if stop_requests:
        printer.system(f"{signal.Signals(stop_requests[0]).name} received, stopping")

    children = [child for child in children if child not in held]
    for child in children:
        if child.process.poll() is None:
            child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    killed = False
    running = list(children)
    while running:
        for child in list(running):
            if child.process.poll() is not None:
                running.remove(child)
                printer.system(f"{child.name} stopped (rc={child.process.returncode})")
        if running and (time.monotonic() > deadline or len(stop_requests) > 1):
            for child in running:
                printer.system(f"{child.name} still running: SIGKILL to its process group")
                child.signal(signal.SIGKILL, group=True)
            killed = True
            deadline = float("inf")
        time.sleep(0.05)
    # Leftovers of a killed process, or of one that exited by itself (its children, if any).
    for child in children:
        child.signal(signal.SIGKILL, group=True)
        child.relay.join(timeout=2)
    return 1 if exited_by_itself or killed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.procfile", description=__doc__.splitlines()[0])
    parser.add_argument("procfile", nargs="?", default="Procfile", type=Path)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS, help="seconds before SIGKILL")
    parser.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="arguments added to one line, e.g. flower=--port=15555 (the last of a repeated option wins)",
    )
    parser.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="NAME=OTHER,...",
        help="start NAME once each OTHER has printed a line ending in ' ready.' (a Celery worker consuming)",
    )
    options = parser.parse_args(argv)
    processes = read_procfile(options.procfile)
    for item in options.append:
        name, _, arguments = item.partition("=")
        if name not in processes:
            parser.error(f"--append {item}: no {name} in {options.procfile}")
        processes[name] += f" {arguments}"
    after = {}
    for item in options.after:
        name, _, others = item.partition("=")
        after[name] = others.split(",")
        if not set(after[name]) | {name} <= set(processes):
            parser.error(f"--after {item}: not every name is in {options.procfile}")
    return run(processes, grace=options.grace, after=after)


if __name__ == "__main__":
    sys.exit(main())
