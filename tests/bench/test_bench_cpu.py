"""bench/cpu.py: the CPU the bench credits to each process of the stack, read from /proc, with real processes."""

import os
import subprocess
import sys
import time

import pytest

from bench import cpu

# Each test starts a process of its own: out of the unit tier.
pytestmark = pytest.mark.process

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def burn(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)])


def test_a_process_and_the_children_it_reaped_are_credited_to_its_group_and_nothing_else():
    # A parent that runs two children one after the other and waits for each: its own CPU is almost nothing.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"code = {BURN.format(seconds=0.4)!r}\n"
            "for _ in range(2):\n"
            "    subprocess.run([sys.executable, '-c', code], check=True)\n"
            "time.sleep(30)\n",
        ]
    )
    bystander = burn(0.3)
    try:
        before = cpu.snapshot({"group": parent.pid}, broker_pid=bystander.pid)
        began = time.monotonic()
        deadline = began + 20
        while cpu.snapshot({"group": parent.pid}, broker_pid=None)["group"] - before["group"] < 0.8:
            assert time.monotonic() < deadline, "the two children's CPU never reached their parent's group"
            time.sleep(0.2)
        after = cpu.snapshot({"group": parent.pid}, broker_pid=bystander.pid)
    finally:
        parent.kill()
        parent.wait()
        bystander.wait()

    # Both children (0.4 s each, reaped by the parent) are counted, once; the bystander is not in the group.
    assert 0.75 <= after["group"] - before["group"] <= 1.3, (before, after)
    spent = cpu.spent(before, after, wall_seconds=time.monotonic() - began, orders=4)
    assert 190 <= spent["cpu_ms_per_order"]["group"] <= 330, spent
    assert spent["cores"] == os.cpu_count()
    assert spent["total_cpu_ms_per_order"] >= spent["cpu_ms_per_order"]["group"]


def test_a_workers_main_process_is_reported_apart_and_not_added_to_the_total():
    worker = burn(0.3)
    try:
        time.sleep(0.1)
        before = cpu.snapshot({"worker-x": worker.pid}, broker_pid=None)
        worker.wait(20)
    finally:
        worker.kill()
    # Gone: its last reading is what the group had. The main process alone equals the group (no children).
    assert set(before) >= {"worker-x", "worker-x main", "postgresql", "broker", "bench clients"}
    assert before["worker-x main"] == before["worker-x"]
    after = {**before, "worker-x": before["worker-x"] + 1, "worker-x main": before["worker-x main"] + 1}
    spent = cpu.spent(before, after, wall_seconds=1, orders=1)
    assert spent["cpu_ms_per_order"]["worker-x main"] == 1000
    assert spent["total_cpu_ms_per_order"] == 1000  # the main process's second is the worker's, counted once
