"""Faults around training: run directory locks (two trainers, two sweeps, a killed holder), SIGTERM
(checkpoint, exit code 143, exact resume) and workers whose sweep dies.

Processes are started in their own session and their whole group is killed afterwards, so a
failing test leaves nothing running; every wait has a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ablations.plan import DONE, PARTIAL, build_plan, preset_dir, run_status
from ablations.studies import get_preset
from ablations.workers import WorkerPool
from manifold_lab.cli import DeferredInterrupt, Interrupted, run_main
from manifold_lab.train import records
from manifold_lab.train.lock import RunLock, RunLocked, locked_by
from manifold_lab.train.run_dir import LOCK_FILE, RunDir

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
# the engine tests' tiny run (tests/test_train.py): digits at 16 px, six steps
FLAGS = ["--dataset", "digits", "--image-size", "16", "--width", "0.35", "--batch-size", "16", "--steps", "6",
         "--log-every", "1", "--eval-every", "3", "--lr", "0.005", "--eval-bn", "running", "--quiet"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "MANIFOLD_LAB_ALLOCATOR": "system"}

# Holds the lock of the run directory argv[1] until killed.
HOLDER = ("import sys, time\n"
          "from manifold_lab.train.lock import RunLock\n"
          "RunLock(sys.argv[1]).acquire()\n"
          "print('locked', flush=True)\n"
          "time.sleep(600)\n")
# ``python -m manifold_lab.train``, each metrics line followed by half a second's pause, so that a
# signal reliably lands mid-run.
SLOW_TRAIN = ("import runpy, sys, time\n"
              "from manifold_lab.train import records\n"
              "append = records.MetricsLog.append\n"
              "def slow(self, record):\n"
              "    append(self, record)\n"
              "    time.sleep(0.5)\n"
              "records.MetricsLog.append = slow\n"
              "runpy.run_module('manifold_lab.train', run_name='__main__', alter_sys=True)\n")


def _start(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=ENV, start_new_session=True, **kwargs)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str,
              proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def _hold(run_dir: Path) -> subprocess.Popen:
    """A process holding ``run_dir``'s lock."""
    holder = _start([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def _gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in RunDir(run_dir).metrics(drop_partial_tail=True)]


def _without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in records.TIMING_KEYS} for r in RunDir(run_dir).metrics()]


# ----------------------------------------------------------------------------- locks

def test_a_locked_run_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from manifold_lab.train.__main__ import main as train_main
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(RunLocked) as info:
            RunLock(run).acquire()
        assert (info.value.holder.host, info.value.holder.pid) == (HOST, holder.pid)
        assert locked_by(run) == f"pid {holder.pid} on {HOST}"
        # the command line: exit code 2, one line naming the holder; nothing written
        assert run_main(train_main, FLAGS + ["--out", str(run)], prog="train") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locked by pid {holder.pid} on {HOST}" in err[0], err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: its name stays in the lock file
        holder.wait(timeout=30)
        assert locked_by(run) is None
        lines: list[str] = []
        with RunLock(run, lines.append), RunLock(run):  # taken over once; re-entrant in one process
            assert len(lines) == 1 and f"taking over the lock left by pid {holder.pid} on {HOST}" in lines[0]
            assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
            assert locked_by(run) is None  # held by this process: nobody else
        assert not (run / LOCK_FILE).exists() and RunDir(run).status()[0] == "missing"
    finally:
        _kill_group(holder)


def test_a_sweep_passes_over_a_run_another_process_holds(tmp_path, capsys, monkeypatch):
    """The held run looks corrupt (a trainer that has just started): it is neither trained nor
    quarantined, only reported; once its holder is killed, the next sweep takes the lock over,
    quarantines the leftover and trains it."""
    from test_ablations import FakeTrainer, _patch_trainer
    from ablations.run import main as sweep_main
    fake = FakeTrainer()
    _patch_trainer(monkeypatch, fake)
    preset = get_preset("smoke")
    held, other = build_plan("fig6a", preset)
    root = preset_dir(tmp_path, preset)
    holder = _hold(root / held.run_id)
    argv = ["fig6a", "--preset", "smoke", "--out", str(tmp_path), "--workers", "1", "--no-measure"]
    try:
        (root / held.run_id / "config.json").write_text("{}")
        assert run_main(sweep_main, argv, prog="sweep") == 0
        out = capsys.readouterr().out
        assert f"{held.run_id} ({held.describe_members()}): locked by pid {holder.pid} on {HOST}, skipped" in out
        assert "1 of 2 complete; 1 skipped" in out
        assert [c[1] for c in fake.calls] == [(0,)]
        assert run_status(root / other.run_id, other.expected_config())[0] == DONE
        assert (root / held.run_id / "config.json").read_text() == "{}" and not (root / "_quarantine").exists()
        # the worker pool looks before it starts a worker: none is started for the held run
        pool = WorkerPool(root, [[0]], lambda run, cpus: pytest.fail(f"worker started for {run.run_id}"),
                          lambda line: None, cost=lambda r: 0.0, poll_s=0.05)
        assert pool.execute([held, other]) == 0 and pool.skipped == [held.run_id] and pool.trained == 0
    finally:
        _kill_group(holder)
    assert run_main(sweep_main, argv, prog="sweep") == 0
    out = capsys.readouterr().out
    assert f"taking over the lock left by pid {holder.pid} on {HOST}" in out
    assert len(list((root / "_quarantine").iterdir())) == 1
    assert run_status(root / held.run_id, held.expected_config())[0] == DONE


def test_two_sweeps_on_one_folder_train_every_run_once(tmp_path):
    """Two real sweeps started together on one results folder: each run trained by one of them,
    the other says it passed it over; every metrics line once."""
    argv = [sys.executable, "-m", "ablations.run", "fig6a", "--preset", "smoke", "--out", str(tmp_path),
            "--workers", "1", "--multi-seed", "off", "--no-measure"]
    sweeps = [_start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in sweeps]
    finally:
        for p in sweeps:
            _kill_group(p)
    assert [p.returncode for p in sweeps] == [0, 0], outs
    preset = get_preset("smoke")
    root = preset_dir(tmp_path, preset)
    text = "\n".join(outs)
    for run in build_plan("fig6a", preset):
        assert text.count(f"{run.run_id} ({run.describe_members()}): training") == 1, text
        assert run_status(root / run.run_id, run.expected_config())[0] == DONE
        steps = _steps(root / run.run_id)
        assert steps and len(steps) == len(set(steps)), steps
    assert "skipped, locked by another process" in text and ": locked by pid " in text, text


# ----------------------------------------------------------------------------- signals

def test_run_main_exit_codes_for_ctrl_c_and_sigterm(capsys):
    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)  # outside any training loop: raised at once
        time.sleep(5)
        pytest.fail("SIGTERM did not stop main")

    def interrupted(argv):
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    assert run_main(terminated, [], prog="prog") == 143
    assert capsys.readouterr().err == "prog: interrupted by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) == previous
    assert run_main(interrupted, [], prog="prog") == 130
    assert capsys.readouterr().err == "prog: interrupted by Ctrl-C\n"


def test_deferred_interrupt_ignores_a_repeated_sigterm_and_stops_at_a_second_ctrl_c():
    with DeferredInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler and the sweep both sent it
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
    with pytest.raises(Interrupted) as info:
        with DeferredInterrupt() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert info.value.exit_code == 130


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_is_exact(tmp_path, capsys):
    from manifold_lab.train.__main__ import main as train_main
    from manifold_lab.train.checkpoint import Checkpointer
    run, reference = tmp_path / "run", tmp_path / "reference"
    proc = _start([sys.executable, "-c", SLOW_TRAIN, *FLAGS, "--out", str(run)],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_steps(run)) >= 2, 300, "second metrics line", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM at step" in lines[0] and "checkpoint saved" in lines[0], err
    steps = _steps(run)
    checkpointer = Checkpointer(run)
    try:
        assert checkpointer.steps() == [steps[-1]] and steps[-1] < 6
    finally:
        checkpointer.close()
    assert not RunDir(run).summary_path.exists() and not (run / LOCK_FILE).exists()
    assert run_main(train_main, FLAGS + ["--out", str(reference)], prog="train") == 0
    assert run_main(train_main, ["--out", str(run), "--resume", "--quiet"], prog="train") == 0
    capsys.readouterr()
    assert _without_timing(run) == _without_timing(reference)
    assert RunDir(run).summary()["final_test_loss"] == RunDir(reference).summary()["final_test_loss"]


def test_sigterm_to_a_sweep_reaches_its_workers_at_once_and_waits_for_them(tmp_path):
    """Only the parent gets SIGTERM (``kill``, Kubernetes): it passes it on without the Ctrl-C grace
    period, waits while the workers save, and stops with :class:`Interrupted` (exit code 143)."""
    runs = build_plan("all", get_preset("smoke"))[:2]
    child = ("import signal, sys, time\n"
             "def stop(*_):\n"
             "    time.sleep(0.5); open(sys.argv[1], 'a').write('saved\\n'); raise SystemExit(143)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    root = tmp_path / "smoke"
    logs = [root / "_logs" / f"{run.run_id}.log" for run in runs]

    def terminate_parent_when_workers_are_ready() -> None:
        deadline = time.monotonic() + 45
        while not all(p.exists() and "ready" in p.read_text() for p in logs) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    pool = WorkerPool(root, [[0], [0]], lambda run, cpus: [sys.executable, "-c", child,
                                                           str(tmp_path / f"{run.run_id}.saved")],
                      lambda line: None, cost=lambda r: 0.0, poll_s=0.05, grace_s=120)
    threading.Thread(target=terminate_parent_when_workers_are_ready, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(Interrupted) as info:
        pool.execute(runs)
    assert info.value.exit_code == 143 and time.monotonic() - start < 60
    for run in runs:
        assert (tmp_path / f"{run.run_id}.saved").read_text() == "saved\n"


# ----------------------------------------------------------------------------- orphaned workers

# A parent that starts a worker which calls stop_with_parent (prctl, or with argv[2] == "poll" the
# fallback thread) and saves on SIGTERM, prints the worker's pid, and waits to be killed.
PARENT = """
import subprocess, sys, time
worker = '''
import os, signal, sys, time
from ablations import workers
if sys.argv[2] == "poll":
    workers._parent_death_signal = lambda signum: False
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("saved"), sys.exit(143)))
workers.stop_with_parent(os.getppid(), poll_s=0.1)
print("ready", flush=True)
time.sleep(60)
'''
child = subprocess.Popen([sys.executable, "-c", worker, sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["prctl", "poll"])
def test_a_worker_gets_sigterm_when_its_parent_is_killed(tmp_path, how):
    marker = tmp_path / "saved"
    parent = _start([sys.executable, "-c", PARENT, str(marker), how], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        parent.kill()
        _wait_for(lambda: _gone(worker), 20, f"end of worker {worker}")
        assert marker.read_text() == "saved"
    finally:
        _kill_group(parent)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two workers need two CPU cores")
def test_killing_a_sweep_stops_its_workers_after_a_checkpoint(tmp_path):
    """``kill -9`` of a real sweep with two workers training long runs: both workers save a
    checkpoint and end within seconds, and their metrics stop growing."""
    argv = [sys.executable, "-m", "ablations.run", "fig6a", "--preset", "smoke", "--set", "steps=100000",
            "--set", "log_every=1", "--set", "eval_every=100000", "--out", str(tmp_path), "--workers", "2",
            "--no-measure"]
    sweep = _start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "smoke"
    try:
        _wait_for(lambda: len(list(root.glob("*/metrics.jsonl"))) == 2
                  and all(_steps(p.parent) for p in root.glob("*/metrics.jsonl")), 300, "training workers", sweep)
        workers = [json.loads(p.read_text())["pid"] for p in root.glob(f"*/{LOCK_FILE}")]
        assert len(workers) == 2 and sweep.pid not in workers
        sweep.kill()
        _wait_for(lambda: all(_gone(pid) for pid in workers), 60, "end of the orphaned workers")
        sizes = [p.stat().st_size for p in root.glob("*/metrics.jsonl")]
        time.sleep(1.0)
        assert [p.stat().st_size for p in root.glob("*/metrics.jsonl")] == sizes
    finally:
        _kill_group(sweep)
    for run in root.glob("*/metrics.jsonl"):
        assert RunDir(run.parent).status()[0] == PARTIAL and not (run.parent / LOCK_FILE).exists()
    for log in (root / "_logs").iterdir():
        assert "interrupted by SIGTERM at step" in log.read_text().strip().splitlines()[-1]
