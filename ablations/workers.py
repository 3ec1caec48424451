"""Runs of a sweep side by side: one child process per run, each pinned to its own CPU cores.

On a CPU, XLA's intra-op threads barely speed up the small networks of the CPU presets: the
Fashion-MNIST baseline's training step took 50 ms on 2 threads and 48 ms on one core, so two runs
side by side, one per core, train about twice the images per second of one run on both cores
(``benchmarks/README.md``, "Sweep workers"). :class:`WorkerPool` starts the costliest runs first
(multiply-adds x training length, from the cost model) and hands each freed core the next run. A
child is ``python -m ablations.run ... --only RUN_ID --cpus LIST --worker-of PID``: the same
resume, quarantine, locking and verification logic as a sequential sweep, its output in
``RESULTS/<preset>/_logs/<run id>.log``.

Stopping: a worker gets SIGTERM when its parent ends, however it ends (even ``kill -9``:
:func:`stop_with_parent`), so no orphan goes on writing; it finishes its step, saves a checkpoint
and exits. The parent itself passes SIGTERM on to its workers at once, Ctrl-C after a grace period
(a terminal sends Ctrl-C to every process of the group), waits for them to save, and raises
:class:`~manifold_lab.cli.Interrupted` (exit code 143 or 130). A run whose folder another process
has locked (a second sweep on the same results) is passed over, not counted as failed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from manifold_lab.cli import DeferredInterrupt, Interrupted, UsageError
from manifold_lab.train.lock import locked_by
from manifold_lab.train.run_dir import RunDir
from ablations.plan import DONE, Run, describe_summary, run_status

Log = Callable[[str], None]
Command = Callable[[Run, Sequence[int]], list[str]]


def usable_cpus() -> list[int]:
    """The CPU cores this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def parse_cpus(text: str) -> list[int]:
    """``"0,2-3"`` -> ``[0, 2, 3]`` (ValueError on anything else, or an empty list)."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("no CPUs given")
    return sorted(cpus)


def pin_to_cpus(cpus: Sequence[int]) -> None:
    """Restrict this process to ``cpus``. Call it before JAX creates its CPU client: threads
    started afterwards (XLA's pool is sized from the affinity) inherit the mask."""
    os.sched_setaffinity(0, set(cpus))


def cpu_groups(workers: int, cpus: Sequence[int]) -> list[list[int]]:
    """``cpus`` cut into ``workers`` contiguous groups whose sizes differ by at most one."""
    if not 1 <= workers <= len(cpus):
        raise ValueError(f"cannot split {len(cpus)} CPUs among {workers} workers")
    size, extra = divmod(len(cpus), workers)
    groups, start = [], 0
    for i in range(workers):
        end = start + size + (1 if i < extra else 0)
        groups.append(list(cpus[start:end]))
        start = end
    return groups


#: ``prctl`` option asking for a signal when the parent process ends (``linux/prctl.h``).
_PR_SET_PDEATHSIG = 1


def stop_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Have this worker get SIGTERM, and so save a checkpoint and stop, when ``parent_pid`` (the
    sweep that started it) ends, however it ends: ``prctl(PR_SET_PDEATHSIG)`` on Linux, elsewhere
    a thread that polls :func:`os.getppid` every ``poll_s`` seconds."""
    if not _parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="watch-parent",
                         daemon=True).start()
    if os.getppid() != parent_pid:  # it ended before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def _parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` when the parent ends; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)


def run_cost(run: Run) -> float:
    """Relative training cost of ``run``: multiply-adds per image x epochs (or steps). Only
    comparable between runs of one preset, which is what ordering them needs."""
    from manifold_lab.costs.analytic import model_costs
    from manifold_lab.train.network import model_config_for
    cfg = run.train_config().resolved()
    macs = model_costs(model_config_for(cfg, num_classes=10, in_channels=1), cfg.image_size or 32).madds
    return float(macs) * float(cfg.steps or cfg.epochs)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class WorkerPool:
    """Trains ``runs`` through child processes built by ``command(run, cpus)``, one per CPU group.

    ``root`` is the preset's results folder: a run counts as done when its folder verifies
    there afterwards (:func:`ablations.plan.run_status`), whatever the child's exit code said.
    ``skipped``: the runs passed over because another process held their folder's lock."""

    def __init__(self, root: Path, groups: Sequence[Sequence[int]], command: Command,
                 log: Log, cost: Callable[[Run], float] = run_cost, poll_s: float = 0.5,
                 grace_s: float = 30.0) -> None:
        self.root = root
        self.groups = [list(g) for g in groups]
        self.command = command
        self.log = log
        self.cost = cost
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.failed: list[tuple[str, str]] = []
        self.skipped: list[str] = []
        self.trained = 0

    def log_path(self, run: Run) -> Path:
        return self.root / "_logs" / f"{run.run_id}.log"

    def execute(self, runs: Sequence[Run]) -> int:
        """Train every run of ``runs`` that is not done; returns the number of failed runs. Ctrl-C or
        SIGTERM stops the workers (:meth:`_interrupt`) and raises :class:`Interrupted`."""
        total, done = len(runs), 0
        pending: list[Run] = []
        for run in runs:
            if run_status(self.root / run.run_id, run.expected_config())[0] == DONE:
                done += 1
                self.log(f"[{done}/{total}] {run.run_id} ({run.describe_members()}): done, skipped")
            elif (holder := locked_by(self.root / run.run_id)) is not None:  # another sweep trains it
                done += 1
                self.skipped.append(run.run_id)
                self.log(f"[{done}/{total}] {run.run_id} ({run.describe_members()}): locked by {holder}, skipped")
            else:
                pending.append(run)
        queue = sorted(pending, key=self.cost, reverse=True)  # longest first: the last to end is short
        free = list(self.groups)
        active: dict[subprocess.Popen, tuple[Run, list[int], float]] = {}
        (self.root / "_logs").mkdir(parents=True, exist_ok=True)
        with DeferredInterrupt() as stop:
            while (queue or active) and stop.signum is None:
                while queue and free:
                    run, cpus = queue.pop(0), free.pop(0)
                    done += 1
                    self.log(f"[{done}/{total}] {run.run_id} ({run.describe_members()}): training on "
                             f"CPU {','.join(map(str, cpus))} (log {self.log_path(run)})")
                    with open(self.log_path(run), "ab") as out:
                        child = subprocess.Popen(self.command(run, cpus), stdout=out,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                    active[child] = (run, cpus, time.perf_counter())
                time.sleep(self.poll_s)
                for child in [c for c in active if c.poll() is not None]:
                    run, cpus, start = active.pop(child)
                    free.append(cpus)
                    self._finish(run, child.returncode, time.perf_counter() - start)
            if stop.signum is not None:
                self._interrupt(active, stop.signum)
                raise Interrupted(stop.signum, f"after stopping {len(active)} running workers (each saves a "
                                               f"checkpoint); run the sweep again to continue")
        return len(self.failed)

    def _finish(self, run: Run, code: int, elapsed: float) -> None:
        status, reason = run_status(self.root / run.run_id, run.expected_config())
        holder = None if status == DONE else locked_by(self.root / run.run_id)
        if holder is not None:  # another sweep took the folder first: the worker passed it over
            self.skipped.append(run.run_id)
            self.log(f"  {run.run_id}: locked by {holder}, skipped")
            return
        self.trained += 1
        if status == DONE:
            try:
                summary = RunDir(self.root / run.run_id).summary()
            except UsageError:
                summary = None
            self.log(f"  done {run.run_id} in {elapsed:.1f}s: {describe_summary(summary)}")
            return
        why = _last_line(self.log_path(run)) or f"run is {status}: {reason}"
        self.failed.append((run.run_id, f"exit code {code}: {why}"))
        self.log(f"  FAILED {run.run_id} (exit code {code}): {why}")

    def _interrupt(self, active: dict[subprocess.Popen, tuple[Run, list[int], float]], signum: int) -> None:
        """Stop the running workers and wait while they save their checkpoints. SIGTERM may have
        reached this process alone (``kill``, Kubernetes): it is passed on at once. Ctrl-C at a
        terminal reached the whole process group: it is passed on only to workers still running
        after ``grace_s`` (this process alone was signalled), never twice to one that is saving."""
        deadline = time.monotonic() + (0.0 if signum == signal.SIGTERM else self.grace_s)
        for child in active:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.send_signal(signum)
        for child in active:
            child.wait()
