"""Sweep workers: CPU lists and groups, and the pool's scheduling, verification and failures, with
child processes that write fake finished runs (the real trainer in workers runs in
``test_ablations.test_real_smoke_preset_end_to_end``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ablations.plan import DONE, build_plan, preset_dir, run_status
from ablations.studies import get_preset
from ablations.workers import WorkerPool, cpu_groups, parse_cpus, run_cost

TESTS = Path(__file__).resolve().parent

# A child: writes run RUN_ID as a finished fake run (or fails for the id "FAIL_ID"), and records its
# CPU affinity and its start and end times.
CHILD = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from manifold_lab.train import TrainConfig
from test_ablations import _write_fake_run
root, run_id, spec, cpus, fail_id = sys.argv[1:6]
os.sched_setaffinity(0, {{int(c) for c in cpus.split(",")}})
start = time.time()
time.sleep(0.3)
if run_id == fail_id:
    print("step 12: loss is nan; stopping")
    raise SystemExit(3)
_write_fake_run(TrainConfig(**json.loads(spec)), Path(root) / run_id)
record = {{"run": run_id, "cpus": sorted(os.sched_getaffinity(0)), "start": start, "end": time.time()}}
with open(Path(root) / "children.jsonl", "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def test_parse_cpus():
    assert parse_cpus("0") == [0]
    assert parse_cpus("0,2-3") == [0, 2, 3]
    assert parse_cpus("3,1-2,2") == [1, 2, 3]
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


@pytest.mark.parametrize("workers, cpus, expected", [
    (2, [0, 1], [[0], [1]]),
    (1, [0, 1], [[0, 1]]),
    (2, [0, 1, 2], [[0, 1], [2]]),
    (3, [4, 5, 6, 7, 8, 9, 10], [[4, 5, 6], [7, 8], [9, 10]]),
])
def test_cpu_groups_partition_the_cpus(workers, cpus, expected):
    groups = cpu_groups(workers, cpus)
    assert groups == expected
    assert sorted(c for g in groups for c in g) == cpus


def test_cpu_groups_refuse_more_workers_than_cpus():
    with pytest.raises(ValueError):
        cpu_groups(3, [0, 1])


def test_run_cost_orders_wider_networks_first():
    runs = build_plan("fig5", get_preset("cpu"))
    costs = {r.spec["width"]: run_cost(r) for r in runs}
    assert costs[1.0] > costs[0.5] > costs[0.35] > 0


def test_pool_trains_every_missing_run_once_pinned_and_reports_failures(tmp_path):
    preset = get_preset("smoke")
    runs = build_plan("all", preset)
    root = preset_dir(tmp_path, preset)
    root.mkdir(parents=True)
    fail_id = runs[1].run_id
    script = CHILD.format(tests=str(TESTS))

    def command(run, cpus):
        return [sys.executable, "-c", script, str(root), run.run_id, json.dumps(dict(run.spec)),
                ",".join(map(str, cpus)), fail_id]

    cpu = sorted(os.sched_getaffinity(0))[0]
    lines: list[str] = []
    pool = WorkerPool(root, [[cpu], [cpu]], command, lines.append, cost=lambda r: 0.0, poll_s=0.05)
    assert pool.execute(runs) == 1
    assert pool.trained == len(runs) == 4
    assert [rid for rid, _ in pool.failed] == [fail_id]
    assert "exit code 3: step 12: loss is nan; stopping" in pool.failed[0][1]
    records = [json.loads(x) for x in (root / "children.jsonl").read_text().splitlines()]
    assert sorted(r["run"] for r in records) == sorted(r.run_id for r in runs if r.run_id != fail_id)
    assert all(r["cpus"] == [cpu] for r in records)
    # never more than two children at once
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    for run in runs:
        expected = DONE if run.run_id != fail_id else "missing"
        assert run_status(root / run.run_id, run.expected_config())[0] == expected
    assert (root / "_logs" / f"{fail_id}.log").read_text().strip() == "step 12: loss is nan; stopping"

    # a second pass skips the finished runs and retries only the failed one
    lines.clear()
    pool = WorkerPool(root, [[cpu], [cpu]], command, lines.append, cost=lambda r: 0.0, poll_s=0.05)
    assert pool.execute(runs) == 1 and pool.trained == 1
    assert sum("done, skipped" in ln for ln in lines) == 3


def test_cpus_flag_pins_the_process(tmp_path):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    code = f"""
import sys
from ablations.run import main
from manifold_lab.cli import run_main
import os
code = run_main(main, ["fig6a", "--preset", "smoke", "--out", {str(tmp_path)!r}, "--cpus", "{cpu}",
                       "--only", "nope", "--workers", "1"], prog="run")
print(sorted(os.sched_getaffinity(0)), code)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "2"  # --only names no run of the plan: a usage error
    assert "--only: no run 'nope'" in out.stderr
    assert out.stdout.strip().startswith(f"[{cpu}]")


def test_interrupt_reaches_children_that_did_not_get_it_and_waits_for_them(tmp_path):
    """Only the parent is interrupted: after the grace period each running child gets SIGINT once,
    saves (here: writes a marker) and exits; the parent re-raises KeyboardInterrupt after them."""
    preset = get_preset("smoke")
    runs = build_plan("all", preset)[:2]
    child = ("import signal, sys, time\n"
             "def stop(*_):\n"
             "    open(sys.argv[1], 'a').write('saved\\n'); raise SystemExit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    root = tmp_path / "smoke"
    logs = [root / "_logs" / f"{run.run_id}.log" for run in runs]
    interrupted = threading.Event()

    def interrupt_parent_when_children_are_ready() -> None:
        deadline = time.monotonic() + 45
        while not all(p.exists() and "ready" in p.read_text() for p in logs):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        interrupted.set()
        os.kill(os.getpid(), signal.SIGINT)  # the parent alone, not its process group

    pool = WorkerPool(root, [[0], [0]], lambda run, cpus: [sys.executable, "-c", child,
                                                           str(tmp_path / f"{run.run_id}.saved")],
                      lambda line: None, cost=lambda r: 0.0, poll_s=0.05, grace_s=0.5)
    # The Python-level handler, re-installed at the C level too (sigaction), whatever ran before in
    # this worker process: the test is about the pool, not about the process it happens to run in.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_parent_when_children_are_ready, daemon=True).start()
        start = time.monotonic()
        try:
            pool.execute(runs)
        except KeyboardInterrupt:
            pass
        else:
            pytest.fail(f"execute returned (SIGINT sent: {interrupted.is_set()}); child logs: "
                        f"{[p.read_text() if p.exists() else None for p in logs]}")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    assert time.monotonic() - start < 30
    for run in runs:
        assert (tmp_path / f"{run.run_id}.saved").read_text() == "saved\n"
